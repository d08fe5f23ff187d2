"""RegNet-X/Y (Radosavovic et al., 2020) as in timm: the DeiT distillation teacher (RegNetY-160).

A RegNet is four stages of residual bottleneck blocks (1x1 conv -> grouped 3x3 conv -> SE ->
1x1 conv, BatchNorm after each conv), preceded by a 3x3 stride-2 stem and followed by global
average pooling and a linear classifier. The per-stage widths, depths and group sizes are not
listed but generated from six numbers (w0, wa, wm, depth, group_size, SE ratio): block j gets the
continuous width w0 + wa * j, snapped to w0 * wm^k, quantised to a multiple of 8; equal widths
form a stage; then the bottleneck width is rounded to a multiple of the group size.

Numerically identical to timm's ``RegNet`` in eval mode (logits and stage features, any input
size); parameter and batch-statistic names follow timm's state_dict, so the checkpoint mapping
below (``torch_key``, ``checkpoint_filter_fn``) is a renaming plus layout transposes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax.models.layers import BatchNorm, Dtype, drop_path

WIDTH_QUANTUM = 8  # block widths are multiples of 8 (pycls `q`)
STEM_WIDTH = 32
HEAD_INIT_STD = 0.01  # timm: Linear layers ~ N(0, 0.01), biases zero


@dataclasses.dataclass(frozen=True)
class RegNetSpec:
  """Generator parameters of a RegNet (pycls / timm ``RegNetCfg``, the fields they use here).

  Attributes:
    depth: total number of blocks.
    w0: initial width (a multiple of 8).
    wa: width slope per block.
    wm: width multiplier between stages (> 1).
    group_size: channels per group of the 3x3 convolutions.
    se_ratio: squeeze-excitation width as a fraction of the block's INPUT width (0 = RegNet-X).
    bottle_ratio: bottleneck width / block width (1 for every X/Y model).
  """

  depth: int
  w0: int
  wa: float
  wm: float
  group_size: int
  se_ratio: float = 0.0
  bottle_ratio: float = 1.0


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One stage as derived from a RegNetSpec: ``depth`` blocks of ``width`` channels, the first
  with stride 2; grouped 3x3 convs with ``group_size`` channels per group."""

  depth: int
  width: int
  group_size: int
  bottle_ratio: float = 1.0


# The names and numbers of timm's registry (model FLOPs = the trailing digits x 1e8).
VARIANTS: dict[str, RegNetSpec] = {
  'regnetx_002': RegNetSpec(13, 24, 36.44, 2.49, 8),
  'regnetx_004': RegNetSpec(22, 24, 24.48, 2.54, 16),
  'regnetx_006': RegNetSpec(16, 48, 36.97, 2.24, 24),
  'regnetx_008': RegNetSpec(16, 56, 35.73, 2.28, 16),
  'regnetx_016': RegNetSpec(18, 80, 34.01, 2.25, 24),
  'regnetx_032': RegNetSpec(25, 88, 26.31, 2.25, 48),
  'regnetx_040': RegNetSpec(23, 96, 38.65, 2.43, 40),
  'regnetx_064': RegNetSpec(17, 184, 60.83, 2.07, 56),
  'regnetx_080': RegNetSpec(23, 80, 49.56, 2.88, 120),
  'regnetx_120': RegNetSpec(19, 168, 73.36, 2.37, 112),
  'regnetx_160': RegNetSpec(22, 216, 55.59, 2.1, 128),
  'regnetx_320': RegNetSpec(23, 320, 69.86, 2.0, 168),
  'regnety_002': RegNetSpec(13, 24, 36.44, 2.49, 8, se_ratio=0.25),
  'regnety_004': RegNetSpec(16, 48, 27.89, 2.09, 8, se_ratio=0.25),
  'regnety_006': RegNetSpec(15, 48, 32.54, 2.32, 16, se_ratio=0.25),
  'regnety_008': RegNetSpec(14, 56, 38.84, 2.4, 16, se_ratio=0.25),
  'regnety_016': RegNetSpec(27, 48, 20.71, 2.65, 24, se_ratio=0.25),
  'regnety_032': RegNetSpec(21, 80, 42.63, 2.66, 24, se_ratio=0.25),
  'regnety_040': RegNetSpec(22, 96, 31.41, 2.24, 64, se_ratio=0.25),
  'regnety_064': RegNetSpec(25, 112, 33.22, 2.27, 72, se_ratio=0.25),
  'regnety_080': RegNetSpec(17, 192, 76.82, 2.19, 56, se_ratio=0.25),
  'regnety_120': RegNetSpec(19, 168, 73.36, 2.37, 112, se_ratio=0.25),
  'regnety_160': RegNetSpec(18, 200, 106.23, 2.48, 112, se_ratio=0.25),  # the DeiT teacher
  'regnety_320': RegNetSpec(20, 232, 115.89, 2.53, 232, se_ratio=0.25),
}


# ---------------------------------------------------------------------------------------------
# The generator.
# ---------------------------------------------------------------------------------------------
def block_widths(spec: RegNetSpec) -> list[int]:
  """Width of every block, in float32 arithmetic as timm/pycls compute it (rounding half to
  even), so that values landing near a rounding boundary round the same way."""
  f32 = np.float32
  if not (spec.wa >= 0 and spec.w0 > 0 and spec.wm > 1 and spec.w0 % WIDTH_QUANTUM == 0):
    raise ValueError(f'invalid RegNet parameters {spec}: need wa >= 0, wm > 1, w0 % 8 == 0')
  continuous = np.arange(spec.depth, dtype=f32) * f32(spec.wa) + f32(spec.w0)
  exponents = np.round(np.log(continuous / f32(spec.w0)) / f32(math.log(spec.wm)))
  widths = np.round(f32(spec.w0) * np.power(f32(spec.wm), exponents) / f32(WIDTH_QUANTUM))
  return [int(w) * WIDTH_QUANTUM for w in widths]


def stage_specs(spec: RegNetSpec) -> tuple[StageSpec, ...]:
  """The four stages of ``spec``: equal block widths grouped, then each bottleneck width rounded
  to a multiple of its group size (the group size capped at the bottleneck width)."""
  widths, depths = np.unique(np.asarray(block_widths(spec)), return_counts=True)
  if len(widths) != 4:
    raise ValueError(f'{spec} generates {len(widths)} stages; a RegNet here has exactly 4')
  stages = []
  for width, depth in zip(widths.tolist(), depths.tolist()):
    bottleneck = int(width * spec.bottle_ratio)
    group_size = min(spec.group_size, bottleneck)
    bottleneck = int(round(bottleneck / group_size) * group_size)
    width = int(bottleneck / spec.bottle_ratio)
    stages.append(StageSpec(depth, width, group_size, spec.bottle_ratio))
  return tuple(stages)


# ---------------------------------------------------------------------------------------------
# Layers.
# ---------------------------------------------------------------------------------------------
def _conv_init(kernel_size: int, features: int, groups: int):
  """timm's RegNet conv init: N(0, sqrt(2 / fan_out)), fan_out = k * k * out / groups."""
  std = math.sqrt(2.0 / (kernel_size * kernel_size * features / groups))
  return nn.initializers.normal(std)


class ConvBN(nn.Module):
  """KxK convolution without bias (PyTorch padding ((stride - 1) + (K - 1)) // 2), BatchNorm
  and, optionally, ReLU: timm's ``ConvNormAct``. Zero-initialised BN scale with ``zero_init``."""

  features: int
  kernel_size: int = 1
  stride: int = 1
  groups: int = 1
  relu: bool = True
  zero_init: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    k = self.kernel_size
    pad = ((self.stride - 1) + (k - 1)) // 2
    x = nn.Conv(
      self.features,
      (k, k),
      strides=(self.stride, self.stride),
      padding=((pad, pad), (pad, pad)),
      feature_group_count=self.groups,
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=_conv_init(k, self.features, self.groups),
      name='conv',
    )(x)
    # timm zero-initialises the last BN of each residual branch (zero_init_last).
    scale_init = nn.initializers.zeros if self.zero_init else nn.initializers.ones
    x = BatchNorm(dtype=self.dtype, scale_init=scale_init, name='bn')(x, train)
    return jax.nn.relu(x) if self.relu else x


class SqueezeExcite(nn.Module):
  """x * sigmoid(fc2(relu(fc1(mean_hw(x))))) with 1x1 convs (with bias) as Dense layers."""

  reduced: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)

    def fc(width, name):
      return nn.Dense(
        width,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=_conv_init(1, width, 1),
        bias_init=nn.initializers.zeros,
        name=name,
      )

    gate = fc(features, 'fc2')(jax.nn.relu(fc(self.reduced, 'fc1')(pooled)))
    return x * jax.nn.sigmoid(gate).astype(x.dtype)


class Bottleneck(nn.Module):
  """RegNet block: relu(shortcut(x) + DropPath(conv3(SE(conv2(conv1(x)))))).

  The shortcut is the identity, or a strided 1x1 conv + BN where the width or resolution
  changes (first block of a stage). SE width = round(se_ratio * input width).
  """

  features: int
  stride: int
  group_size: int
  se_ratio: float
  bottle_ratio: float = 1.0
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    bottleneck = int(round(self.features * self.bottle_ratio))
    conv_bn = lambda *a, **k: ConvBN(*a, dtype=self.dtype, **k)
    y = conv_bn(bottleneck, 1, name='conv1')(x, train)
    y = conv_bn(
      bottleneck, 3, stride=self.stride, groups=bottleneck // self.group_size, name='conv2'
    )(y, train)
    if self.se_ratio:
      y = SqueezeExcite(int(round(in_features * self.se_ratio)), dtype=self.dtype, name='se')(y)
    y = conv_bn(self.features, 1, relu=False, zero_init=True, name='conv3')(y, train)
    shortcut = x
    if in_features != self.features or self.stride != 1:
      shortcut = conv_bn(self.features, 1, stride=self.stride, relu=False, name='downsample')(
        x, train
      )
    return jax.nn.relu(drop_path(self.drop_path, y, train) + shortcut)


class ClassifierHead(nn.Module):
  """The linear classifier (timm's ``head.fc``), float32."""

  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    return nn.Dense(
      self.num_classes,
      dtype=jnp.float32,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.normal(HEAD_INIT_STD),
      bias_init=nn.initializers.zeros,
      name='fc',
    )(features)


class RegStage(nn.Module):
  """``stage.depth`` blocks named b1, b2, ...; the first one strided."""

  stage: StageSpec
  se_ratio: float
  drop_path_rates: Sequence[float]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for b in range(self.stage.depth):
      x = Bottleneck(
        self.stage.width,
        stride=2 if b == 0 else 1,
        group_size=self.stage.group_size,
        se_ratio=self.se_ratio,
        bottle_ratio=self.stage.bottle_ratio,
        drop_path=self.drop_path_rates[b],
        dtype=self.dtype,
        name=f'b{b + 1}',
      )(x, train)
    return x


class RegNet(nn.Module):
  """RegNet classifier (NHWC).

  ``__call__(images, train=False)`` takes float images [B, H, W, 3] (ImageNet-normalised) of any
  size and returns ``(logits, out)``: logits float32 [B, num_classes], and ``out`` with ``stem``
  [B, H/2, W/2, 32], ``stage1`` .. ``stage4`` (strides 4 to 32, NHWC, in the compute dtype) and
  ``pre_logits`` float32 [B, C4] (global average of stage4). Sizes round up at every stride.
  """

  stages: Sequence[StageSpec]
  se_ratio: float = 0.0
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'expected images [batch, height, width, 3] (NHWC), got {images.shape}')
    total = sum(s.depth for s in self.stages)
    rates = np.linspace(0.0, self.drop_path_rate, total).tolist() if total > 1 else [0.0]
    out: dict[str, Any] = {}
    x = ConvBN(STEM_WIDTH, 3, stride=2, dtype=self.dtype, name='stem')(
      images.astype(self.dtype), train
    )
    out['stem'] = x
    first = 0
    for s, stage in enumerate(self.stages, start=1):
      x = RegStage(
        stage,
        se_ratio=self.se_ratio,
        drop_path_rates=tuple(rates[first : first + stage.depth]),
        dtype=self.dtype,
        name=f's{s}',
      )(x, train)
      first += stage.depth
      out[f'stage{s}'] = x
    features = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    out['pre_logits'] = features
    return ClassifierHead(self.num_classes, name='head')(features), out


def create_model(
  name: str,
  *,
  num_classes: int = 1000,
  drop_path_rate: float = 0.0,
  dtype: Dtype = jnp.float32,
) -> RegNet:
  """Builds a registered RegNet ('regnety_160', 'regnety_002', ...; see ``VARIANTS``).

  Args:
    num_classes: classifier width.
    drop_path_rate: stochastic depth of the last block (linear over all blocks, as timm).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters, BatchNorm statistics, the pooled
      features and the logits stay float32.
  """
  if name not in VARIANTS:
    raise ValueError(f'unknown RegNet {name!r}; available: {sorted(VARIANTS)}')
  spec = VARIANTS[name]
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  return RegNet(
    stages=stage_specs(spec),
    se_ratio=spec.se_ratio,
    num_classes=num_classes,
    drop_path_rate=drop_path_rate,
    dtype=dtype,
  )


def list_models() -> list[str]:
  return sorted(VARIANTS)


# ---------------------------------------------------------------------------------------------
# timm / DeiT checkpoints: names and layouts (the checkpoint filter).
# ---------------------------------------------------------------------------------------------
_LEAF = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}


def torch_key(path: tuple[str, ...]) -> str:
  """timm state_dict key of a Flax variable path (collection name excluded).

  ('s3', 'b2', 'conv2', 'conv', 'kernel') -> 's3.b2.conv2.conv.weight',
  ('stem', 'bn', 'var') -> 'stem.bn.running_var'. The module names are timm's.
  """
  parts = list(path)
  parts[-1] = _LEAF.get(parts[-1], parts[-1])
  return '.'.join(parts)


def to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  """Flax array -> the timm tensor layout: conv HWIO -> OIHW, SE Dense [I, O] -> 1x1 conv
  [O, I, 1, 1], the classifier [I, O] -> [O, I]."""
  if value.ndim == 4:
    return value.transpose(3, 2, 0, 1)
  if value.ndim == 2:
    return value.T if key == 'head.fc.weight' else value.T[:, :, None, None]
  return value


def from_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  """Inverse of ``to_torch_layout``."""
  if value.ndim == 4 and '.se.' in key:
    return value[:, :, 0, 0].T
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def checkpoint_filter_fn(state: Mapping[str, Any]) -> dict[str, Any]:
  """A timm or DeiT RegNet state_dict with the keys ``torch_key`` produces: the training
  wrapper ({'model': ...}) and DistributedDataParallel's 'module.' prefix removed,
  ``num_batches_tracked`` dropped. DeiT's regnety_160-a5fe301d.pth and timm's
  ``regnety_160.deit_in1k`` already use timm's names."""
  if 'model' in state and isinstance(state['model'], Mapping):
    state = state['model']
  out = {}
  for key, value in state.items():
    key = key.removeprefix('module.')
    if not key.endswith('num_batches_tracked'):
      out[key] = value
  return out
