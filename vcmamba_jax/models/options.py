"""How a VCMamba model computes, not what it computes: one frozen object that the model builds
from its public fields and hands down to its stages and Mamba layers."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

from vcmamba_jax.models.ops import DepthwiseImpl
from vcmamba_jax.models.scan import SCAN_IMPLS, ScanImpl

ScanMode = Literal['upstream', 'corrected']
SCAN_MODES = ('upstream', 'corrected')
RematMlp = Literal['none', 'fc2_input', 'all']
REMAT_MLP = get_args(RematMlp)
DEPTHWISE_IMPLS = get_args(DepthwiseImpl)


@dataclasses.dataclass(frozen=True)
class ComputeOptions:
  """Options shared by every layer that has them.

  scan_mode: 'upstream' reproduces the released models (quirks in models/mamba.py), 'corrected'
    permutes delta/B/C with u and applies the dt bias once (cannot load the released weights).
  scan_impl: the selective scan's implementation (models/scan.py: 'auto' picks per platform).
  remat_scan: recompute the scan's states in the backward pass instead of keeping them.
  depthwise_impl: the depthwise convolutions' implementation (models/ops.py; 'auto' = the
    Pallas kernels in training on GPUs, the taps VJP elsewhere, XLA's convolution in inference).
  scan_blocks: run each stage's FFN blocks as one `nn.scan`, so that the compiler sees one
    block per stage instead of one per block. Same parameters (names and shapes), same numbers.
    A trade (B, bf16, batch 128, one H100, 2026-12-07): train-step compile 57 -> 52 s, peak
    memory -0.35 GiB, but each step 14% slower (1,449 -> 1,242 img/s); on a TPU v5e the compile
    is 18% shorter and the memory per chip 30% larger. (It also cut the state init 42 -> 24 s,
    measured before the init program drew with threefry kernels, which cut it more.) Off by
    default.
  remat_mlp: which of the conv Mlp's GELU outputs the backward pass recomputes (from the
    BatchNorm inputs it keeps anyway) instead of keeping: 'none', 'fc2_input' (the second, fc2's
    input) or 'all' (also the first, the depthwise conv's input). Same numbers. B, bf16, batch 128,
    one H100 (2026-12-07): 'none' 88.3 ms a step at 13.14 GiB peak (earlier calls), 'fc2_input'
    87.5 ms at 9.48 GiB, 'all' 89.4 ms at 7.57 GiB. Default 'fc2_input'.
  """

  scan_mode: ScanMode = 'upstream'
  scan_impl: ScanImpl = 'auto'
  remat_scan: bool = True
  depthwise_impl: DepthwiseImpl = 'auto'
  scan_blocks: bool = False
  remat_mlp: RematMlp = 'fc2_input'

  def __post_init__(self):
    for name, valid in (
      ('scan_mode', SCAN_MODES),
      ('scan_impl', SCAN_IMPLS),
      ('depthwise_impl', DEPTHWISE_IMPLS),
      ('remat_mlp', REMAT_MLP),
    ):
      if getattr(self, name) not in valid:
        raise ValueError(f'{name} must be one of {valid}, got {getattr(self, name)!r}')
    for name in ('remat_scan', 'scan_blocks'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'{name} must be True or False, got {getattr(self, name)!r}')

  @classmethod
  def of(cls, module: Any) -> ComputeOptions:
    """The options from a model's flat fields of the same names."""
    return cls(**{f.name: getattr(module, f.name) for f in dataclasses.fields(cls)})
