"""What the Pallas/Triton GPU kernels (`scan_pallas`, `depthwise_pallas`) share: their compiler
parameters and the probe that decides, once per process, whether a kernel can run here."""

from __future__ import annotations

import logging
from collections.abc import Callable

import jax


def compiler_params(num_warps: int, num_stages: int = 1):
  """Triton launch parameters (num_stages > 1: Triton's software pipelining of a kernel's loop
  loads). Pallas's Triton backend is deprecated from JAX 0.11 (Mosaic GPU is its successor);
  older releases named the class TritonCompilerParams."""
  from jax.experimental.pallas import triton as plgpu

  params = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams
  return params(num_warps=num_warps, num_stages=num_stages)


def probe(run: Callable[[], object], kernel: str, fallback: str) -> bool:
  """Calls `run` (which compiles and runs the kernel on tiny inputs); True if it works, else False
  with one logged line naming the `fallback` that callers then use, never an exception."""
  try:
    run()
    return True
  except Exception as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    logging.warning(
      'vcmamba_jax: the %s is unavailable with jax %s (%s: %s); using %s instead.',
      kernel,
      jax.__version__,
      type(e).__name__,
      first_line,
      fallback,
    )
    return False
