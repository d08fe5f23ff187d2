"""PyTorch <-> Flax weights for VCMamba: names, layouts, strict loading and the reverse export.

The mapping is derived from the Flax variable tree, one path segment at a time, so it covers every
variant (and any depth/width override) without a hand-written key table:

    params/stem/conv1/kernel [3,3,3,16]           <-> patch_embed.0.weight [16,3,3,3]
    batch_stats/stem/bn1/var                      <-> patch_embed.1.running_var
    params/downsample3/proj/kernel                <-> network.3.proj.weight
    params/stage2/block0/layer_scale [C]          <-> network.2.0.layer_scale_2 [C,1,1]
    params/stage4/block4/mamba/in_conv/kernel     <-> network.6.4.mamba.in_conv.0.weight [E,C,1,1]
    params/stage4/pos_embed [1,7,7,C]             <-> pos_embed [1,C,7,7]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import re
import zipfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from vcmamba_jax.models import vcmamba as vcmamba_lib

# Dense layers that are 1x1 convolutions upstream ([O, I, 1, 1] instead of Linear's [O, I]).
_CONV1X1_MODULES = ('mlp.fc1', 'mlp.fc2', 'mamba.in_conv.0', 'mamba.out_conv.1')
_STEM = {'conv1': '0', 'bn1': '1', 'conv2': '3', 'bn2': '4'}
_MAMBA = {
  'in_conv': 'in_conv.0',
  'in_norm': 'in_conv.1',
  'out_conv': 'out_conv.1',
  'out_norm': 'out_conv.2',
}
_LEAF = {
  'kernel': 'weight',
  'scale': 'weight',
  'mean': 'running_mean',
  'var': 'running_var',
  'layer_scale': 'layer_scale_2',
}
_CHECKPOINT_CONTAINERS = ('state_dict', 'model', 'model_ema')


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded into the requested model (wrong variant, keys, shapes)."""


# ---------------------------------------------------------------------------------------------
# Names and layouts
# ---------------------------------------------------------------------------------------------
def torch_key(path: tuple[str, ...]) -> str:
  """PyTorch state_dict key of a Flax variable path (without the collection name)."""
  head, rest = path[0], list(path[1:])
  if head == 'stem':
    parts = ['patch_embed', _STEM[rest[0]]] + rest[1:]
  elif head.startswith('downsample'):
    parts = [f'network.{2 * int(head[len("downsample") :]) - 3}'] + rest
  elif head.startswith('stage'):
    if rest == ['pos_embed']:
      return 'pos_embed'
    block = rest[0]
    if not block.startswith('block'):
      raise KeyError(f'unexpected variable path {"/".join(path)}')
    parts = [f'network.{2 * (int(head[len("stage") :]) - 1)}', block[len('block') :]] + rest[1:]
    if len(parts) > 3 and parts[2] == 'mamba' and parts[3] in _MAMBA:
      parts[3] = _MAMBA[parts[3]]
  else:
    parts = [head] + rest
  parts[-1] = _LEAF.get(parts[-1], parts[-1])
  return '.'.join(parts)


def _to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
  if key == 'pos_embed':
    return value.transpose(0, 3, 1, 2)
  if key.endswith('layer_scale_2'):
    return value.reshape(-1, 1, 1)
  if key.endswith('.weight') and value.ndim == 4:  # conv HWIO -> OIHW
    return value.transpose(3, 2, 0, 1)
  if key.endswith('.weight') and value.ndim == 2:
    module = key[: -len('.weight')]
    if module.endswith(_CONV1X1_MODULES):
      return value.T[:, :, None, None]
    if not module.endswith(('direction_Bs', 'A_log')):
      return value.T
  return value


def _from_torch_layout(key: str, value: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray:
  if key == 'pos_embed' and value.ndim == 4:
    value = value.transpose(0, 2, 3, 1)
  elif key.endswith('layer_scale_2'):
    value = value.reshape(-1)
  elif key.endswith('.weight') and value.ndim == 4 and len(flax_shape) == 4:
    value = value.transpose(2, 3, 1, 0)
  elif key.endswith('.weight') and value.ndim == 4 and len(flax_shape) == 2:  # 1x1 conv -> Dense
    if value.shape[2:] != (1, 1):
      raise CheckpointError(f'{key}: expected a 1x1 convolution, got {value.shape}')
    value = value[:, :, 0, 0].T
  elif key.endswith('.weight') and value.ndim == 2 and not key.endswith(('direction_Bs', 'A_log')):
    value = value.T
  return value


def to_pytorch_state_dict(
  tree: Mapping[str, Any], name: str | None = None, *, include_num_batches_tracked: bool = True
) -> dict[str, np.ndarray]:
  """Maps a Flax tree to PyTorch names and layouts (float32 numpy arrays).

  ``tree`` is shaped like the variables (``{'params': ..., 'batch_stats': ...}``) or like the
  params alone (e.g. gradients). With batch statistics present, ``num_batches_tracked`` (0) is
  added so the result loads with ``load_state_dict(strict=True)`` into the authors' model.
  ``name`` is accepted for symmetry with the loader and checked when given.
  """
  if name is not None and name not in vcmamba_lib.VARIANTS:
    raise ValueError(f'unknown model {name!r}; available: {sorted(vcmamba_lib.VARIANTS)}')
  collections = dict(tree) if 'params' in tree else {'params': tree}
  state: dict[str, np.ndarray] = {}
  for collection, subtree in collections.items():
    if collection not in ('params', 'batch_stats'):
      continue
    for path, value in traverse_util.flatten_dict(subtree).items():
      key = torch_key(path)
      state[key] = _to_torch_layout(key, np.asarray(jax.device_get(value)))
  if include_num_batches_tracked and 'batch_stats' in collections:
    for key in [k for k in state if k.endswith('.running_mean')]:
      state[key[: -len('running_mean')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return state


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------
def _read_pth(path: str) -> Mapping[str, Any]:
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs PyTorch: pip install 'vcmamba_jax[torch]' (or convert the file "
      'to .safetensors / .npz on a machine that has torch)'
    ) from e
  # weights_only: never execute pickled code. The authors' training checkpoints also hold an
  # argparse.Namespace ('args'), which is allowed explicitly and nothing else.
  try:
    with torch.serialization.safe_globals([argparse.Namespace]):
      obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
    refused = re.search(r'GLOBAL ([\w.]+)', str(e))
    if refused:
      raise CheckpointError(
        f'{path}: loading refused for safety: the file asks to import {refused.group(1)}, which '
        'is not tensor data (unpickling it could run arbitrary code). Only state_dicts of '
        'tensors (plus argparse.Namespace) are read; if you trust the file, re-save just its '
        'tensors (torch.save(state_dict) or safetensors) and load that.'
      ) from None
    raise CheckpointError(
      f'could not read {path} as a PyTorch checkpoint '
      f'({type(e).__name__}: {str(e)[:300]}); is the file corrupt or '
      'truncated?'
    ) from e
  return obj


def _read_file(path: str) -> Mapping[str, Any]:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no checkpoint file at {path}')
  suffix = os.path.splitext(path)[1].lower()
  if suffix in ('.pth', '.pt', '.bin', '.ckpt'):
    return _read_pth(path)
  if suffix == '.npz':
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if not k.startswith('__')}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
      raise CheckpointError(f'could not read {path} as .npz ({e}); is it corrupt?') from e
  if suffix == '.safetensors':
    try:
      return safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
      raise CheckpointError(f'could not read {path} as safetensors ({e}); is it corrupt?') from e
  raise CheckpointError(
    f'unsupported checkpoint format {suffix!r} for {path}: expected .pth/.pt, .npz or .safetensors'
  )


def _unwrap(obj: Mapping[str, Any], path: str) -> Mapping[str, Any]:
  """The state_dict inside a raw state_dict or a training checkpoint dict."""
  if not isinstance(obj, Mapping):
    raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state_dict')
  for container in _CHECKPOINT_CONTAINERS:
    if container in obj and isinstance(obj[container], Mapping):
      return obj[container]
  return obj


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # torch.Tensor
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  value = np.asarray(value)
  if value.dtype in (np.float16, np.float64) or value.dtype.name == 'bfloat16':
    value = value.astype(np.float32)
  return value


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch-named state_dict from .pth/.pt (raw or a training checkpoint holding it
  under 'state_dict', 'model' or 'model_ema'), .npz (keys starting with '__' are ignored) or
  .safetensors. Floating tensors come back as float32 numpy arrays."""
  path = os.fspath(path)
  state = _unwrap(_read_file(path), path)
  out = {}
  for key, value in state.items():
    key = key[len('module.') :] if key.startswith('module.') else key
    out[key] = _to_numpy(value)
  return out


# ---------------------------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------------------------
def _torch_shape(key: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
  return _to_torch_layout(key, np.empty(flax_shape, np.float32)).shape


def expected_state_dict_shapes(model) -> dict[str, tuple[int, ...]]:
  """PyTorch key -> shape for every variable of ``model`` (num_batches_tracked excluded)."""
  # Shapes depend on the structure alone; caching them keeps variant detection (which looks at
  # every registered variant) and repeated loads from re-tracing the model.
  key = (
    tuple(model.depths),
    tuple(model.widths),
    model.num_mamba_layers,
    model.num_classes,
    vcmamba_lib.grid_size(model.img_size),
    model.mlp_ratio,
  )
  return dict(_expected_shapes(key))


@functools.lru_cache(maxsize=32)
def _expected_shapes(key: tuple) -> tuple[tuple[str, tuple[int, ...]], ...]:
  depths, widths, num_mamba_layers, num_classes, grid, mlp_ratio = key
  model = vcmamba_lib.VCMamba(
    depths=depths,
    widths=widths,
    num_mamba_layers=num_mamba_layers,
    num_classes=num_classes,
    img_size=32 * grid,
    mlp_ratio=mlp_ratio,
  )
  abstract = vcmamba_lib.abstract_variables(model)
  shapes = []
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
      torch_name = torch_key(path)
      shapes.append((torch_name, _torch_shape(torch_name, tuple(leaf.shape))))
  return tuple(shapes)


def _variant_signature(shapes: Mapping[str, tuple[int, ...]]) -> tuple:
  widths = tuple(shapes.get(f'network.{i}.proj.weight', (0,))[0] for i in (1, 3, 5))
  blocks = tuple(
    len({k.split('.')[2] for k in shapes if k.startswith(f'network.{s}.')}) for s in (0, 2, 4, 6)
  )
  mamba = len({k.split('.')[2] for k in shapes if '.mamba.' in k})
  return widths, blocks, mamba


def guess_variant(state: Mapping[str, Any]) -> str | None:
  """The registered variant whose structure (widths, depths, Mamba layers) matches ``state``."""
  shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
  sig = _variant_signature(shapes)
  for name in vcmamba_lib.VARIANTS:
    model = vcmamba_lib.create_model(name)
    if _variant_signature(expected_state_dict_shapes(model)) == sig:
      return name
  return None


def checkpoint_geometry(state: Mapping[str, np.ndarray]) -> dict[str, int]:
  """img_size and num_classes implied by a checkpoint (pos_embed grid, head width)."""
  out = {}
  if 'pos_embed' in state and np.ndim(state['pos_embed']) == 4:
    out['img_size'] = 32 * int(state['pos_embed'].shape[-1])
  if 'head.weight' in state:
    out['num_classes'] = int(state['head.weight'].shape[0])
  return out


@dataclasses.dataclass(frozen=True)
class KeyDiff:
  """How a checkpoint's tensors differ from a model's (key -> shape on both sides)."""

  expected: Mapping[str, tuple[int, ...]]
  given: Mapping[str, tuple[int, ...]]

  @property
  def missing(self) -> list[str]:
    return sorted(set(self.expected) - set(self.given))

  @property
  def unexpected(self) -> list[str]:
    return sorted(set(self.given) - set(self.expected))

  @property
  def mismatched(self) -> list[str]:
    common = set(self.expected) & set(self.given)
    return sorted(k for k in common if self.expected[k] != self.given[k])

  def __bool__(self) -> bool:
    return bool(self.missing or self.unexpected or self.mismatched)

  def error(self, lines: list[str]) -> CheckpointError:
    """``lines`` (the headline and hints) followed by the offending keys, 12 of each at most."""
    lines = list(lines)
    expected, given = self.expected, self.given
    for title, keys, fmt in (
      ('missing keys', self.missing, lambda k: f'{k} {expected[k]}'),
      ('unexpected keys', self.unexpected, lambda k: f'{k} {given[k]}'),
      (
        'shape mismatches',
        self.mismatched,
        lambda k: f'{k}: checkpoint {given[k]} vs model {expected[k]}',
      ),
    ):
      if keys:
        more = f' (+{len(keys) - 12} more)' if len(keys) > 12 else ''
        lines.append(f'{title} ({len(keys)}): {", ".join(fmt(k) for k in keys[:12])}{more}')
    return CheckpointError('\n  '.join(lines))


def state_dict_to_variables(
  state: Mapping[str, np.ndarray], model, *, source: str = 'checkpoint'
) -> dict[str, Any]:
  """Strictly maps a PyTorch state_dict onto ``model``'s variable tree.

  Every checkpoint tensor must be used (``num_batches_tracked`` aside) and every variable
  filled with the right shape; otherwise a CheckpointError lists the offending keys and shapes and,
  for a checkpoint of another variant, names the variant it looks like.
  """
  expected = expected_state_dict_shapes(model)
  given = {k: tuple(np.shape(v)) for k, v in state.items() if not k.endswith('num_batches_tracked')}
  diff = KeyDiff(expected, given)
  if diff:
    mismatched = diff.mismatched
    lines = [f'{source} does not fit this model']
    guess = guess_variant(state)
    model_sig = _variant_signature(expected)
    if (
      guess is not None
      and _variant_signature(expected_state_dict_shapes(vcmamba_lib.create_model(guess)))
      != model_sig
    ):
      lines[0] += f': it looks like a {guess} checkpoint; pass name={guess!r}'
    elif guess is None and (diff.missing or diff.unexpected):
      lines[0] += ' (its structure matches no registered variant)'
    if 'pos_embed' in mismatched and given['pos_embed'][-1] != expected['pos_embed'][-1]:
      grid = given['pos_embed'][-1]  # a different resolution, not a different width
      lines.append(
        f'pos_embed is {grid}x{grid} but the model expects '
        f'{expected["pos_embed"][-1]}x{expected["pos_embed"][-1]}: pass '
        f'img_size={32 * grid} (or omit img_size to infer it)'
      )
    if 'head.weight' in mismatched:
      lines.append(
        f'head has {given["head.weight"][0]} classes, the model '
        f'{expected["head.weight"][0]}: pass num_classes={given["head.weight"][0]}'
      )
    raise diff.error(lines)

  abstract = vcmamba_lib.abstract_variables(model)
  variables = {}
  for collection in ('params', 'batch_stats'):
    flat = {}
    for path, leaf in traverse_util.flatten_dict(abstract[collection]).items():
      key = torch_key(path)
      value = _from_torch_layout(key, np.asarray(state[key]), tuple(leaf.shape))
      if not np.issubdtype(value.dtype, np.floating):
        raise CheckpointError(f'{key} has dtype {value.dtype}, expected floating point')
      assert value.shape == tuple(leaf.shape), (key, value.shape, leaf.shape)
      flat[path] = jnp.asarray(value, dtype=jnp.float32)
    variables[collection] = traverse_util.unflatten_dict(flat)
  return variables


def load_pytorch_weights(path: str | os.PathLike, name: str, **create_kwargs):
  """Loads the authors' weights (or any PyTorch-named VCMamba state_dict) into a Flax model.

  Args:
    path: .pth/.pt (raw state_dict, or a checkpoint dict holding it under 'model',
      'state_dict' or 'model_ema'), .npz or .safetensors. float16/bfloat16 weights are upcast.
    name: 'vcmamba_s' | 'vcmamba_m' | 'vcmamba_b' (or 'vcmamba_nano').
    **create_kwargs: forwarded to ``create_model``. ``img_size`` and ``num_classes`` default to
      what the checkpoint holds (its pos_embed grid and head width).

  Returns:
    (model, variables) with ``variables = {'params': ..., 'batch_stats': ...}``.
  """
  state = read_state_dict(path)
  for key, value in checkpoint_geometry(state).items():
    create_kwargs.setdefault(key, value)
  model = vcmamba_lib.create_model(name, **create_kwargs)
  return model, state_dict_to_variables(state, model, source=os.fspath(path))
