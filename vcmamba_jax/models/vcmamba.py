"""The VCMamba family (S/M/B): conv stem, EfficientFormer-style FFN stages, and multi-directional
Mamba layers at the end of the last stage. Exact port of the authors' classification model."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.models.layers import (
  Downsample,
  DropPathNoise,
  Dtype,
  FFNBlock,
  Stem,
  dense,
  layer_norm,
  normal_init,
)
from vcmamba_jax.models.mamba import PlainMambaLayer
from vcmamba_jax.models.ops import DepthwiseImpl
from vcmamba_jax.models.options import ComputeOptions, RematMlp, ScanMode


@dataclasses.dataclass(frozen=True)
class VariantSpec:
  depths: tuple[int, int, int, int]
  widths: tuple[int, int, int, int]
  num_mamba_layers: int = 4  # upstream `vit_num`: the LAST blocks of stage 4


VARIANTS: dict[str, VariantSpec] = {
  # Registered upstream as VCMamba_EfficientFormer_{S,M,B}; M mixes l3 depths with l1 widths.
  'vcmamba_s': VariantSpec(depths=(4, 4, 12, 8), widths=(32, 64, 144, 288)),
  'vcmamba_m': VariantSpec(depths=(4, 4, 12, 6), widths=(48, 96, 224, 448)),
  'vcmamba_b': VariantSpec(depths=(4, 4, 12, 6), widths=(64, 128, 320, 512)),
  # Not a paper variant: a few-hundred-thousand-parameter model for smoke runs and CPU demos.
  'vcmamba_nano': VariantSpec(depths=(1, 1, 2, 3), widths=(16, 32, 48, 64), num_mamba_layers=2),
}


def grid_size(img_size: int) -> int:
  """Side of the stride-32 grid (five stride-2 convs with padding 1: ceil at every step)."""
  size = img_size
  for _ in range(5):
    size = (size + 1) // 2
  return size


def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] interpolation matrix of torch.nn.functional.interpolate(mode='bicubic',
  align_corners=False) (cubic convolution, a = -0.75, clamped borders)."""
  a = -0.75

  def cubic(x):
    x = abs(x)
    if x <= 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
      return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0

  scale = in_size / out_size
  matrix = np.zeros((out_size, in_size), dtype=np.float64)
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    base = math.floor(src)
    frac = src - base
    for k in range(-1, 3):
      idx = min(max(base + k, 0), in_size - 1)
      matrix[i, idx] += cubic(k - frac)
  return matrix


def resize_pos_embed(pos_embed: jax.Array, new_grid: tuple[int, int]) -> jax.Array:
  """Bicubic resize of a [1, h, w, C] position embedding to [1, H, W, C].

  Same numbers as torch's ``F.interpolate(mode='bicubic', align_corners=False)`` on the
  [1, C, h, w] layout (what timm's ``resample_abs_pos_embed`` does). Identity when sizes match.
  """
  _, h, w, _ = pos_embed.shape
  new_h, new_w = new_grid
  if (h, w) == (new_h, new_w):
    return pos_embed
  rows = jnp.asarray(_torch_bicubic_matrix(h, new_h), jnp.float32)
  cols = jnp.asarray(_torch_bicubic_matrix(w, new_w), jnp.float32)
  out = jnp.einsum(
    'Hh,Ww,bhwc->bHWc',
    rows,
    cols,
    pos_embed.astype(jnp.float32),
    precision=jax.lax.Precision.HIGHEST,
  )
  return out.astype(pos_embed.dtype)


# With ComputeOptions.scan_blocks, a stage's FFN blocks run as one nn.scan over a stacked copy
# of their variables, seen inside the stage under this name. The stage's stored variables keep
# the per-block names (block0, block1, ...: those of the PyTorch keys, of checkpoints and of
# weight conversion): `stage_module` maps them to the stacked view and back.
_SCANNED = 'ffn_blocks'


def _scans_blocks(options: ComputeOptions, num_ffn: int) -> bool:
  return options.scan_blocks and num_ffn > 1


class _ScannedFFNBlock(nn.Module):
  """The body of a stage's scan: one FFNBlock, with its drop-path rate as a scanned input."""

  stochastic_depth: bool
  depthwise_impl: DepthwiseImpl
  remat_mlp: RematMlp
  dtype: Dtype

  @nn.compact
  def __call__(
    self, x: jax.Array, rate: jax.Array, noise: jax.Array | None, train: bool
  ) -> tuple[jax.Array, None]:
    block = FFNBlock(
      depthwise_impl=self.depthwise_impl, remat_mlp=self.remat_mlp, dtype=self.dtype, name='block'
    )
    if not self.stochastic_depth:
      return block(x, train), None
    return block(x, train, drop_path_rate=rate, drop_noise=noise), None


def _stack_blocks(num_ffn: int, variables: dict[str, Any]) -> dict[str, Any]:
  """Stored form (block0 .. block{n-1}) -> the scan's view (one tree with a block axis)."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    names = [f'block{j}' for j in range(num_ffn)]
    if all(name in tree for name in names):
      blocks = [tree.pop(name) for name in names]
      tree[_SCANNED] = {'block': jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)}
    out[collection] = tree
  return out


def _unstack_blocks(num_ffn: int, variables: dict[str, Any]) -> dict[str, Any]:
  """The scan's view -> stored form (what init creates and what training updates)."""
  out = {}
  for collection, tree in variables.items():
    tree = dict(tree)
    if _SCANNED in tree:
      stacked = tree.pop(_SCANNED)['block']
      for j in range(num_ffn):
        tree[f'block{j}'] = jax.tree.map(lambda leaf, j=j: leaf[j], stacked)
    out[collection] = tree
  return out


def drop_path_sites(depth: int, num_mamba_layers: int) -> int:
  """Drop-path sites of a stage: one per FFN block, two per Mamba layer (mixer and Mlp)."""
  return depth + num_mamba_layers


class Stage(nn.Module):
  """A stage of FFN blocks; in the last stage, the final ``num_mamba_layers`` blocks are Mamba
  layers preceded by the absolute position embedding. ``drop_noise`` (training with stochastic
  depth): [drop_path_sites, batch], the stage's rows of the model's `DropPathNoise`, in block
  order."""

  depth: int
  num_mamba_layers: int
  drop_path_rates: Sequence[float]
  pos_embed_grid: int | None = None
  options: ComputeOptions = ComputeOptions()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, drop_noise: jax.Array | None = None) -> jax.Array:
    num_ffn = self.depth - self.num_mamba_layers

    def noise(start: int, stop: int | None = None) -> jax.Array | None:
      """Row ``start`` of drop_noise, or rows start:stop; None without it."""
      if drop_noise is None:
        return None
      return drop_noise[start] if stop is None else drop_noise[start:stop]

    if _scans_blocks(self.options, num_ffn):
      rates = self.drop_path_rates[:num_ffn]
      scanned = nn.scan(
        _ScannedFFNBlock,
        variable_axes={'params': 0, 'batch_stats': 0},
        split_rngs={'params': True, 'drop_path': True},
        in_axes=(0, 0, nn.broadcast),
        length=num_ffn,
      )
      x, _ = scanned(
        stochastic_depth=any(rates),
        depthwise_impl=self.options.depthwise_impl,
        remat_mlp=self.options.remat_mlp,
        dtype=self.dtype,
        name=_SCANNED,
      )(x, jnp.asarray(rates, jnp.float32), noise(0, num_ffn), train)
    else:
      for j in range(num_ffn):
        x = FFNBlock(
          drop_path=self.drop_path_rates[j],
          depthwise_impl=self.options.depthwise_impl,
          remat_mlp=self.options.remat_mlp,
          dtype=self.dtype,
          name=f'block{j}',
        )(x, train, drop_noise=noise(j))
    if self.num_mamba_layers:
      grid = self.pos_embed_grid
      pos_embed = self.param('pos_embed', normal_init, (1, grid, grid, x.shape[-1]), jnp.float32)
      pos_embed = resize_pos_embed(pos_embed, x.shape[1:3])
      x = (x + pos_embed).astype(self.dtype)
    for j in range(num_ffn, self.depth):
      site = num_ffn + 2 * (j - num_ffn)
      x = PlainMambaLayer(
        drop_path=self.drop_path_rates[j],
        options=self.options,
        dtype=self.dtype,
        name=f'block{j}',
      )(x, train, drop_noise=noise(site, site + 2))
    return x


@functools.cache
def stage_module(options: ComputeOptions, num_ffn: int) -> type[nn.Module]:
  """The Stage class for ``num_ffn`` FFN blocks: Stage itself, or with ``options.scan_blocks``
  Stage seen through the stacking of its blocks' variables (params and batch statistics)."""
  if not _scans_blocks(options, num_ffn):
    return Stage
  return nn.map_variables(
    Stage,
    ('params', 'batch_stats'),
    trans_in_fn=functools.partial(_stack_blocks, num_ffn),
    trans_out_fn=functools.partial(_unstack_blocks, num_ffn),
    mutable=True,
  )


def hierarchy(
  images: jax.Array,
  train: bool,
  *,
  depths: Sequence[int],
  widths: Sequence[int],
  num_mamba_layers: int,
  drop_path_rate: float,
  pos_embed_grid: int,
  stem_activation: str,
  options: ComputeOptions,
  dtype: Dtype,
) -> tuple[jax.Array, list[jax.Array]]:
  """Stem, then the stages (a Downsample before each after the first): ``(stem output, [stage1
  .. stage4 outputs])``, NHWC. Called inside a compact ``__call__`` (the classifier's or the
  segmentation backbone's), so the layers are that module's ``stem``, ``downsample2..4`` and
  ``stage1..4``, the names of the PyTorch keys. Stochastic depth rises linearly over all blocks
  to ``drop_path_rate``; the Mamba layers and the ``pos_embed`` of ``pos_embed_grid`` x
  ``pos_embed_grid`` close the last stage."""
  total_blocks = sum(depths)
  rates = [drop_path_rate * k / max(total_blocks - 1, 1) for k in range(total_blocks)]
  mamba = [num_mamba_layers if s == len(depths) else 0 for s in range(1, len(depths) + 1)]
  sites = [drop_path_sites(depth, m) for depth, m in zip(depths, mamba)]
  noise = None
  if train and drop_path_rate > 0:  # every site's draw at once (DropPathNoise says why)
    noise = DropPathNoise(sum(sites), name='drop_path_noise')(images.shape[0])
  x = images.astype(dtype)
  stem = Stem(widths[0], activation=stem_activation, dtype=dtype, name='stem')(x, train)
  x, features, first = stem, [], 0
  for s, (depth, width) in enumerate(zip(depths, widths), start=1):
    if s > 1:
      x = Downsample(width, dtype=dtype, name=f'downsample{s}')(x, train)
    last = s == len(depths)
    x = stage_module(options, depth - (num_mamba_layers if last else 0))(
      depth=depth,
      num_mamba_layers=num_mamba_layers if last else 0,
      drop_path_rates=tuple(rates[first : first + depth]),
      pos_embed_grid=pos_embed_grid if last else None,
      options=options,
      dtype=dtype,
      name=f'stage{s}',
    )(x, train, None if noise is None else noise[sum(sites[: s - 1]) : sum(sites[:s])])
    first += depth
    features.append(x)
  return stem, features


class VCMamba(nn.Module):
  """VCMamba classifier.

  ``__call__(images, train=False)`` takes float NHWC images (already normalised) of any size and
  returns ``(logits, out)``: logits [B, num_classes] float32 = mean of the two heads (the eval
  output of the authors' model), and ``out`` with the intermediates ``stem``, ``stage1`` ..
  ``stage4`` (NHWC), ``pre_logits`` [B, C4], ``logits_head`` and ``logits_dist``.
  """

  depths: Sequence[int]
  widths: Sequence[int]
  num_mamba_layers: int = 4
  num_classes: int = 1000
  img_size: int = 224  # fixes the pos_embed grid: ceil(img_size / 32)
  drop_path_rate: float = 0.0
  mlp_ratio: float = 4.0
  stem_activation: str = 'relu'
  # The fields of ComputeOptions (models/options.py), flat so that create_model takes them.
  scan_mode: ScanMode = 'upstream'
  scan_impl: scan_lib.ScanImpl = 'auto'
  remat_scan: bool = True
  depthwise_impl: DepthwiseImpl = 'auto'
  scan_blocks: bool = False
  remat_mlp: RematMlp = 'fc2_input'
  dtype: Dtype = jnp.float32

  @property
  def options(self) -> ComputeOptions:
    return ComputeOptions.of(self)

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    _check_images(images)
    if self.mlp_ratio != 4.0:
      raise ValueError('only mlp_ratio=4 is implemented (as in every released variant)')
    stem, stages = hierarchy(
      images,
      train,
      depths=self.depths,
      widths=self.widths,
      num_mamba_layers=self.num_mamba_layers,
      drop_path_rate=self.drop_path_rate,
      pos_embed_grid=grid_size(self.img_size),
      stem_activation=self.stem_activation,
      options=self.options,
      dtype=self.dtype,
    )
    out: dict[str, Any] = {'stem': stem}
    out.update({f'stage{s}': x for s, x in enumerate(stages, start=1)})
    x = stages[-1]
    batch, height, width, channels = x.shape
    tokens = layer_norm(jnp.float32, name='norm')(x.reshape(batch, height * width, channels))
    features = jnp.mean(tokens, axis=1)
    out['pre_logits'] = features
    head = dense(self.num_classes, dtype=jnp.float32, name='head')(features)
    dist = dense(self.num_classes, dtype=jnp.float32, name='dist_head')(features)
    out['logits_head'], out['logits_dist'] = head, dist
    return (head + dist) / 2, out


def _check_images(images: jax.Array) -> None:
  shape = getattr(images, 'shape', None)
  if shape is None or len(shape) != 4:
    raise ValueError(f'expected images of shape [batch, height, width, 3] (NHWC), got {shape}')
  if shape[-1] != 3:
    hint = ' (looks like NCHW: transpose to NHWC)' if shape[1] == 3 else ''
    raise ValueError(f'expected 3 channels last (NHWC), got shape {tuple(shape)}{hint}')
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise TypeError(
      f'expected float images normalised with the ImageNet mean/std, got {images.dtype}; '
      'convert uint8 images with vcmamba_jax.data.normalize (or (x/255 - mean)/std)'
    )
  if shape[1] < 32 or shape[2] < 32:
    raise ValueError(f'images must be at least 32x32, got {shape[1]}x{shape[2]}')


def variant_fields(
  spec: VariantSpec, module: type[nn.Module], kwargs: dict[str, Any], what: str
) -> dict[str, Any]:
  """``module``'s fields for a variant: its depths/widths/Mamba layers updated by ``kwargs``,
  which must name fields of ``module`` (an error lists the valid ones); the options are checked
  here rather than at the first call."""
  fields = {f.name for f in dataclasses.fields(module)} - {'parent', 'name'}
  unknown = set(kwargs) - fields
  if unknown:
    raise TypeError(f'unknown {what} options {sorted(unknown)}; valid: {sorted(fields)}')
  config = dict(depths=spec.depths, widths=spec.widths, num_mamba_layers=spec.num_mamba_layers)
  config.update(kwargs)
  if config['num_mamba_layers'] > config['depths'][-1]:
    raise ValueError('num_mamba_layers cannot exceed the depth of the last stage')
  option_names = {f.name for f in dataclasses.fields(ComputeOptions)}
  ComputeOptions(**{k: v for k, v in config.items() if k in option_names})
  return config


def create_model(
  name: str,
  *,
  num_classes: int = 1000,
  img_size: int = 224,
  drop_path_rate: float = 0.0,
  dtype: Dtype = jnp.float32,
  **kwargs,
) -> VCMamba:
  """Builds a VCMamba variant ('vcmamba_s', 'vcmamba_m', 'vcmamba_b'; 'vcmamba_nano' for tests).

  Args:
    num_classes: classifier width (both heads).
    img_size: training resolution; fixes the pos_embed grid to ceil(img_size / 32). Inputs of
      other sizes still run (the embedding is resized bicubically on the fly).
    drop_path_rate: stochastic depth of the last block (linear over all blocks).
    dtype: compute dtype (e.g. jnp.bfloat16); parameters, norms and the scan state stay float32.
    **kwargs: other ``VCMamba`` fields: depths, widths, num_mamba_layers, scan_mode
      ('upstream' | 'corrected'), scan_impl ('auto' | 'associative' | 'sequential' | 'chunked' |
      'fused' | 'pallas_tpu'; 'auto' = models.scan.resolve_auto), remat_scan,
      depthwise_impl ('auto' | 'taps' | 'xla' | 'matmul' | 'pallas', see models/ops.py;
      'auto' = 'pallas' in training on GPUs, 'taps' elsewhere, 'xla' in inference),
      scan_blocks (each stage's FFN blocks as one nn.scan), remat_mlp ('none' | 'fc2_input' |
      'all': the Mlp's GELU outputs recomputed in the backward pass), stem_activation.
  """
  if name not in VARIANTS:
    raise ValueError(f'unknown model {name!r}; available: {sorted(VARIANTS)}')
  config = variant_fields(VARIANTS[name], VCMamba, kwargs, 'model')
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  return VCMamba(
    num_classes=num_classes, img_size=img_size, drop_path_rate=drop_path_rate, dtype=dtype, **config
  )


def abstract_variables(model: VCMamba) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of ``model`` as ShapeDtypeStructs (``jax.eval_shape`` of the
  initialiser at ``img_size``: no FLOPs, no memory)."""
  size = 32 * grid_size(model.img_size)
  return jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)), train=False)
  )


def variant_name(model: VCMamba) -> str | None:
  """The registered variant with ``model``'s depths, widths and Mamba layers, or None."""
  structure = (tuple(model.depths), tuple(model.widths), model.num_mamba_layers)
  for name, spec in VARIANTS.items():
    if structure == (spec.depths, spec.widths, spec.num_mamba_layers):
      return name
  return None


def num_params(tree: Any) -> int:
  """Number of scalars in a tree of arrays (or ShapeDtypeStructs), e.g. ``variables['params']``."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def list_models() -> list[str]:
  return sorted(VARIANTS)


def weight_decay_mask(params: Any) -> Any:
  """True where upstream training applies weight decay.

  timm's rule on the PyTorch tensors: no decay for tensors with ndim <= 1 or names ending in
  '.bias'. So biases, BatchNorm/LayerNorm affines and D are exempt, while A_log [E,16],
  direction_Bs [5,16], pos_embed and layer_scale_2 (stored [C,1,1] upstream, [C] here) are decayed.
  """

  def decide(path, leaf):
    name = getattr(path[-1], 'key', str(path[-1]))
    if name == 'bias':
      return False
    return leaf.ndim > 1 or name == 'layer_scale'

  return jax.tree_util.tree_map_with_path(decide, params)
