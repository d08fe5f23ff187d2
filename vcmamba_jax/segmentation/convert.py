"""mmseg-named state_dicts <-> Flax variables of ``SemanticFPN``, strict like the classifier's
loader, and the backbone's initialisation from ImageNet (classification) weights.

Names (the Flax path after the collection name -> mmseg key):

    backbone/<classifier path>                   <-> backbone.<classifier key> (see convert.pytorch)
    neck/lateral_convs_{i}/kernel [C_i, 256]     <-> neck.lateral_convs.{i}.conv.weight [256, C_i, 1, 1]
    neck/fpn_convs_{i}/kernel [3, 3, 256, 256]   <-> neck.fpn_convs.{i}.conv.weight [256, 256, 3, 3]
    decode_head/scale_heads_{i}_{k}/conv/kernel  <-> decode_head.scale_heads.{i}.{2k}.conv.weight
    decode_head/scale_heads_{i}_{k}/bn/var       <-> decode_head.scale_heads.{i}.{2k}.bn.running_var
    decode_head/conv_seg/kernel [128, 150]       <-> decode_head.conv_seg.weight [150, 128, 1, 1]

(The odd indices of ``scale_heads.{i}`` are mmseg's parameter-free Upsample modules.)
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vcmamba_jax.convert import pytorch as pytorch_lib
from vcmamba_jax.convert.pytorch import CheckpointError, KeyDiff
from vcmamba_jax.models import vcmamba as vcmamba_lib
from vcmamba_jax.segmentation import model as model_lib

_LEAF = {'kernel': 'weight', 'scale': 'weight', 'mean': 'running_mean', 'var': 'running_var'}
CLASSIFICATION_ONLY_PREFIXES = ('norm.', 'head.', 'dist_head.')
PosEmbedResize = Literal['bicubic', 'upstream']


def seg_torch_key(path: tuple[str, ...]) -> str:
  """mmseg state_dict key of a ``SemanticFPN`` variable path (without the collection name)."""
  head, rest = path[0], list(path[1:])
  if head == 'backbone':
    return 'backbone.' + pytorch_lib.torch_key(tuple(rest))
  leaf = _LEAF.get(rest[-1], rest[-1])
  if head == 'neck':
    kind, index = rest[0].rsplit('_', 1)
    return f'neck.{kind}.{index}.conv.{leaf}'
  if head == 'decode_head':
    if rest[0] == 'conv_seg':
      return f'decode_head.conv_seg.{leaf}'
    _, _, level, k = rest[0].split('_')
    index = 2 * int(k) if int(level) > 0 else 0
    return f'decode_head.scale_heads.{level}.{index}.{rest[1]}.{leaf}'
  raise KeyError(f'unexpected variable path {"/".join(path)}')


def _to_mmseg_layout(key: str, value: np.ndarray) -> np.ndarray:
  if key.startswith('backbone.'):
    return pytorch_lib._to_torch_layout(key[len('backbone.') :], value)
  if key.endswith('.weight') and value.ndim == 4:  # HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if key.endswith('.weight') and value.ndim == 2:  # Dense [I, O] = 1x1 conv [O, I, 1, 1]
    return value.T[:, :, None, None]
  return value


def _from_mmseg_layout(key: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if key.startswith('backbone.'):
    return pytorch_lib._from_torch_layout(key[len('backbone.') :], value, flax_shape)
  if key.endswith('.weight') and value.ndim == 4 and len(flax_shape) == 4:
    return value.transpose(2, 3, 1, 0)
  if key.endswith('.weight') and value.ndim == 4 and len(flax_shape) == 2:
    if value.shape[2:] != (1, 1):
      raise CheckpointError(f'{key}: expected a 1x1 convolution, got {value.shape}')
    return value[:, :, 0, 0].T
  return value


def to_mmseg_state_dict(
  tree: Mapping[str, Any], *, include_num_batches_tracked: bool = True
) -> dict[str, np.ndarray]:
  """Maps ``SemanticFPN`` variables (or a params-shaped tree, e.g. gradients) to mmseg names and
  layouts (numpy). With batch statistics present, ``num_batches_tracked`` (0) is added so the
  result loads with ``load_state_dict(strict=True)`` into the authors' mmseg model."""
  is_variables = 'params' in tree or 'batch_stats' in tree
  collections = dict(tree) if is_variables else {'params': tree}
  state: dict[str, np.ndarray] = {}
  for collection, subtree in collections.items():
    if collection not in ('params', 'batch_stats'):
      continue
    for path, value in traverse_util.flatten_dict(subtree).items():
      key = seg_torch_key(path)
      state[key] = _to_mmseg_layout(key, np.asarray(jax.device_get(value)))
  if include_num_batches_tracked and 'batch_stats' in collections:
    for key in [k for k in state if k.endswith('.running_mean')]:
      state[key[: -len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return state


def _abstract_variables(model: model_lib.SemanticFPN) -> dict[str, Any]:
  size = max(32, model.img_size)
  return jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)), train=False)
  )


def expected_state_dict_shapes(model: model_lib.SemanticFPN) -> dict[str, tuple[int, ...]]:
  """mmseg key -> shape of every variable of ``model`` (num_batches_tracked excluded)."""
  b = model.backbone
  key = (
    tuple(b.depths),
    tuple(b.widths),
    b.num_mamba_layers,
    model_lib.pos_embed_grid(b.img_size),
    model.num_classes,
    model.fpn_channels,
    model.head_channels,
  )
  return dict(_expected_shapes(key))


@functools.lru_cache(maxsize=32)
def _expected_shapes(key: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
  depths, widths, num_mamba_layers, grid, num_classes, fpn_channels, head_channels = key
  model = model_lib.SemanticFPN(
    backbone=model_lib.VCMambaBackbone(
      depths=depths, widths=widths, num_mamba_layers=num_mamba_layers, img_size=32 * grid
    ),
    num_classes=num_classes,
    fpn_channels=fpn_channels,
    head_channels=head_channels,
  )
  abstract = _abstract_variables(model)
  shapes = []
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
      name = seg_torch_key(path)
      shapes.append((name, _to_mmseg_layout(name, np.empty(leaf.shape, np.float32)).shape))
  return tuple(shapes)


def _guess_seg_variant(state: Mapping[str, Any]) -> str | None:
  backbone = {k[len('backbone.') :]: v for k, v in state.items() if k.startswith('backbone.')}
  variant = pytorch_lib.guess_variant(backbone)
  if variant is None:
    return None
  names = {v: k for k, v in model_lib.SEG_MODELS.items()}
  return names.get(variant)


def state_dict_to_variables(
  state: Mapping[str, np.ndarray], model: model_lib.SemanticFPN, *, source: str = 'checkpoint'
) -> dict[str, Any]:
  """Strictly maps an mmseg state_dict onto ``model``'s variables.

  Every tensor must be used (``num_batches_tracked`` aside) and every variable filled with the
  right shape; otherwise a CheckpointError lists the offending keys and, for a checkpoint of
  another variant, names the model it looks like.
  """
  expected = expected_state_dict_shapes(model)
  given = {k: tuple(np.shape(v)) for k, v in state.items() if not k.endswith('num_batches_tracked')}
  if given and not any(k.startswith(('backbone.', 'neck.', 'decode_head.')) for k in given):
    raise CheckpointError(
      f'{source} has no backbone.*/neck.*/decode_head.* keys: it looks like a classification '
      'checkpoint. Load it with vcmamba_jax.load_pytorch_weights, or start a segmentation '
      'training from it with --config.init_from (its backbone initialises the Semantic FPN).'
    )
  diff = KeyDiff(expected, given)
  if diff:
    mismatched = diff.mismatched
    lines = [f'{source} does not fit this Semantic FPN model']
    guess = _guess_seg_variant(state)
    own = _guess_seg_variant({k: np.empty(s) for k, s in expected.items()})
    if guess is not None and guess != own:
      lines[0] += f': it looks like a {guess} checkpoint; pass name={guess!r}'
    if 'backbone.pos_embed' in mismatched:
      grid = given['backbone.pos_embed'][-1]
      lines.append(
        f'pos_embed is {grid}x{grid} but the model expects '
        f'{expected["backbone.pos_embed"][-1]}x{expected["backbone.pos_embed"][-1]}: pass '
        f'img_size={32 * grid} (or omit img_size to infer it)'
      )
    if 'decode_head.conv_seg.weight' in mismatched:
      n = given['decode_head.conv_seg.weight'][0]
      lines.append(f'the head has {n} classes, the model {model.num_classes}: pass num_classes={n}')
    raise diff.error(lines)

  abstract = _abstract_variables(model)
  variables = {}
  for collection in ('params', 'batch_stats'):
    flat = {}
    for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
      key = seg_torch_key(path)
      value = _from_mmseg_layout(key, np.asarray(state[key]), tuple(leaf.shape))
      if not np.issubdtype(value.dtype, np.floating):
        raise CheckpointError(f'{key} has dtype {value.dtype}, expected floating point')
      flat[path] = jnp.asarray(value, dtype=jnp.float32)
    variables[collection] = traverse_util.unflatten_dict(flat)
  return variables


def _checkpoint_geometry(state: Mapping[str, np.ndarray]) -> dict[str, int]:
  out = {}
  pos_embed = state.get('backbone.pos_embed')
  if pos_embed is not None and np.ndim(pos_embed) == 4:
    out['img_size'] = 32 * int(pos_embed.shape[-1])
  if 'decode_head.conv_seg.weight' in state:
    out['num_classes'] = int(state['decode_head.conv_seg.weight'].shape[0])
  return out


def load_segmentation_weights(path: str | os.PathLike, name: str, **create_kwargs):
  """Loads an mmseg Semantic-FPN VCMamba checkpoint (the authors' ADE20K weights, or any
  ``backbone.*/neck.*/decode_head.*`` state_dict) into a Flax ``SemanticFPN``.

  Args:
    path: .pth (raw state_dict or an mmseg checkpoint holding it under 'state_dict'), .npz or
      .safetensors.
    name: 'sem_fpn_vcmamba_s' | 'sem_fpn_vcmamba_m' | 'sem_fpn_vcmamba_b'.
    **create_kwargs: forwarded to ``create_segmentation_model``; ``img_size`` and
      ``num_classes`` default to what the checkpoint holds (pos_embed grid, conv_seg width).

  Returns:
    (model, variables) with ``variables = {'params': ..., 'batch_stats': ...}``; call
    ``model.apply(variables, images_nhwc, train=False)`` -> (stride-4 logits, out).
  """
  state = pytorch_lib.read_state_dict(path)
  for key, value in _checkpoint_geometry(state).items():
    create_kwargs.setdefault(key, value)
  model = model_lib.create_segmentation_model(name, **create_kwargs)
  return model, state_dict_to_variables(state, model, source=os.fspath(path))


# ---------------------------------------------------------------------------------------------
# Backbone from classification weights (fine-tuning start), pos_embed resizing.
# ---------------------------------------------------------------------------------------------
def upstream_interpolate_pos_embed(pos_embed: np.ndarray, new_size: int) -> np.ndarray:
  """The authors' pos_embed "interpolation" of segmentation fine-tuning (upstream quirk 6).

  ``utils.interpolate_pos_embed`` treats the [1, C, p, p] embedding's memory as [1, p, p, C] (a
  reshape, not a transpose), permutes it to [1, C, p, p] and resizes it bicubically
  (PyTorch: a = -0.75, clamped borders, align_corners False) to [1, C, n, n]: positions and
  channels are scrambled before resizing. Reproduce this only to replicate the authors'
  fine-tuning; ``pos_embed_resize='bicubic'`` is the correct resize.

  Args:
    pos_embed: float [1, C, p, p] in the PyTorch layout.
    new_size: n.

  Returns:
    float32 [1, C, n, n] (PyTorch layout).
  """
  pos_embed = np.asarray(pos_embed, np.float32)
  _, channels, p, _ = pos_embed.shape
  if p == new_size:
    return pos_embed
  scrambled = pos_embed.reshape(1, p, p, channels)  # memory reinterpretation, then NHWC
  resized = vcmamba_lib.resize_pos_embed(jnp.asarray(scrambled), (new_size, new_size))
  return np.asarray(resized).transpose(0, 3, 1, 2)


def backbone_state_from_classification(
  state: Mapping[str, np.ndarray],
  img_size: int,
  *,
  pos_embed_resize: PosEmbedResize = 'bicubic',
) -> dict[str, np.ndarray]:
  """A classification state_dict (the authors' ImageNet weights) as ``backbone.*`` entries for a
  Semantic FPN trained at ``img_size``: classification-only norm/head/dist_head dropped and
  pos_embed resized to ``img_size // 32`` ('bicubic': correct; 'upstream': quirk 6)."""
  if pos_embed_resize not in ('bicubic', 'upstream'):
    raise ValueError(f"pos_embed_resize must be 'bicubic' or 'upstream', got {pos_embed_resize!r}")
  out = {}
  for key, value in state.items():
    if key.startswith('backbone.'):
      key = key[len('backbone.') :]
    elif key.startswith(('neck.', 'decode_head.', 'auxiliary_head.')):
      continue
    if key.startswith(CLASSIFICATION_ONLY_PREFIXES):
      continue
    out['backbone.' + key] = np.asarray(value)
  grid = model_lib.pos_embed_grid(img_size)
  pos_embed = out.get('backbone.pos_embed')
  if pos_embed is not None and pos_embed.shape[-1] != grid:
    if pos_embed_resize == 'upstream':
      out['backbone.pos_embed'] = upstream_interpolate_pos_embed(pos_embed, grid)
    else:
      nhwc = jnp.asarray(np.asarray(pos_embed, np.float32).transpose(0, 2, 3, 1))
      out['backbone.pos_embed'] = np.asarray(
        vcmamba_lib.resize_pos_embed(nhwc, (grid, grid))
      ).transpose(0, 3, 1, 2)
  return out


def init_backbone_from_classification(
  variables: Mapping[str, Any],
  state: Mapping[str, np.ndarray],
  model: model_lib.SemanticFPN,
  *,
  pos_embed_resize: PosEmbedResize = 'bicubic',
  source: str = 'checkpoint',
) -> dict[str, Any]:
  """``variables`` of ``model`` with the backbone replaced by a classification checkpoint's
  weights (strict: every backbone variable filled, no stray backbone tensor); neck and head keep
  their initialisation, as in the authors' fine-tuning."""
  backbone = backbone_state_from_classification(
    state, model.img_size, pos_embed_resize=pos_embed_resize
  )
  current = to_mmseg_state_dict(variables)
  expected = {k for k in current if k.startswith('backbone.') and 'num_batches_tracked' not in k}
  given = {k for k in backbone if 'num_batches_tracked' not in k}
  missing, unexpected = sorted(expected - given), sorted(given - expected)
  if missing or unexpected:
    guess = pytorch_lib.guess_variant({k[len('backbone.') :]: v for k, v in backbone.items()})
    hint = f': it looks like {guess}' if guess else ''
    raise CheckpointError(
      f'{source} does not fit the backbone of this Semantic FPN{hint}; missing '
      f'{missing[:8]}, unexpected {unexpected[:8]}'
    )
  merged = {**current, **backbone}
  return state_dict_to_variables(merged, model, source=source)
