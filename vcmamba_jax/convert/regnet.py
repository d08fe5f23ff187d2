"""timm / DeiT RegNet checkpoints -> Flax variables (strict), and back.

Reads DeiT's ``regnety_160-a5fe301d.pth`` ({'model': state_dict}), timm's own ``.pth`` and
``.safetensors`` files (e.g. ``timm/regnety_160.deit_in1k`` from the Hugging Face Hub) through the
same file reader as the VCMamba weights (``torch.load(weights_only=True)``; no pickled code runs).
The names and layouts are the model's (``models/regnet.py``: ``torch_key``,
``checkpoint_filter_fn``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vcmamba_jax.convert import pytorch as pytorch_lib
from vcmamba_jax.models import regnet as regnet_lib

# Any size works (the model is fully convolutional); 64 keeps shape tracing cheap.
_TRACE_SIZE = 64


def abstract_variables(model: regnet_lib.RegNet) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` of ``model`` as ShapeDtypeStructs (no FLOPs, no memory)."""
  return _abstract_variables(tuple(model.stages), model.se_ratio, model.num_classes)


@functools.lru_cache(maxsize=16)
def _abstract_variables(stages, se_ratio, num_classes) -> dict[str, Any]:
  # Shapes depend on the structure alone; the cache spares re-tracing on every load.
  model = regnet_lib.RegNet(stages=stages, se_ratio=se_ratio, num_classes=num_classes)
  size = _TRACE_SIZE
  return jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)), train=False)
  )


def expected_state_dict_shapes(model: regnet_lib.RegNet) -> dict[str, tuple[int, ...]]:
  """timm key -> tensor shape for every variable of ``model`` (num_batches_tracked excluded)."""
  shapes = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in traverse_util.flatten_dict(abstract_variables(model)[collection]).items():
      key = regnet_lib.torch_key(path)
      shapes[key] = regnet_lib.to_torch_layout(key, np.empty(leaf.shape, np.float32)).shape
  return shapes


def _guess_variant(shapes: Mapping[str, tuple[int, ...]]) -> str | None:
  """The registered RegNet whose stage depths and widths (and SE or not) match a checkpoint."""
  depths = tuple(
    len({k.split('.')[1] for k in shapes if k.startswith(f's{i}.')}) for i in (1, 2, 3, 4)
  )
  widths = tuple(shapes.get(f's{i}.b1.conv3.conv.weight', (0,))[0] for i in (1, 2, 3, 4))
  has_se = any('.se.' in k for k in shapes)
  for name, spec in regnet_lib.VARIANTS.items():
    stages = regnet_lib.stage_specs(spec)
    if (
      tuple(s.depth for s in stages) == depths
      and tuple(s.width for s in stages) == widths
      and bool(spec.se_ratio) == has_se
    ):
      return name
  return None


def state_dict_to_variables(
  state: Mapping[str, Any], model: regnet_lib.RegNet, *, source: str = 'checkpoint'
) -> dict[str, Any]:
  """Strictly maps a timm-named RegNet state_dict onto ``model``'s variables (float32).

  Every tensor must be used (``num_batches_tracked`` aside) and every variable filled with its
  shape; otherwise a ``CheckpointError`` names the missing, unexpected and mis-shaped keys and,
  for a checkpoint of another RegNet, the variant it looks like.
  """
  state = regnet_lib.checkpoint_filter_fn(state)
  expected = expected_state_dict_shapes(model)
  given = {k: tuple(np.shape(v)) for k, v in state.items()}
  diff = pytorch_lib.KeyDiff(expected, given)
  if diff:
    mismatched = diff.mismatched
    lines = [f'{source} does not fit this RegNet']
    guess = _guess_variant(given)
    if guess is not None and regnet_lib.stage_specs(regnet_lib.VARIANTS[guess]) != tuple(
      model.stages
    ):
      lines[0] += f': it looks like a {guess} checkpoint; pass name={guess!r}'
    if 'head.fc.weight' in mismatched:
      lines.append(
        f'head has {given["head.fc.weight"][0]} classes, the model '
        f'{expected["head.fc.weight"][0]}: pass num_classes={given["head.fc.weight"][0]}'
      )
    raise diff.error(lines)

  variables = {}
  for collection in ('params', 'batch_stats'):
    flat = {}
    for path in traverse_util.flatten_dict(abstract_variables(model)[collection]):
      key = regnet_lib.torch_key(path)
      value = np.asarray(pytorch_lib._to_numpy(state[key]))
      if not np.issubdtype(value.dtype, np.floating):
        raise pytorch_lib.CheckpointError(f'{key} has dtype {value.dtype}, expected floating point')
      flat[path] = jnp.asarray(regnet_lib.from_torch_layout(key, value), jnp.float32)
    variables[collection] = traverse_util.unflatten_dict(flat)
  return variables


def to_pytorch_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Flax RegNet variables -> a timm state_dict (float32 numpy; num_batches_tracked = 0), which
  ``timm.create_model(name).load_state_dict(..., strict=True)`` accepts."""
  state = {}
  for collection in ('params', 'batch_stats'):
    for path, value in traverse_util.flatten_dict(variables[collection]).items():
      key = regnet_lib.torch_key(path)
      value = regnet_lib.to_torch_layout(key, np.asarray(jax.device_get(value), np.float32))
      state[key] = np.ascontiguousarray(value)  # safetensors writes the raw buffer
  for key in [k for k in state if k.endswith('.running_mean')]:
    state[key.removesuffix('running_mean') + 'num_batches_tracked'] = np.zeros((), np.int64)
  return state


def load_pytorch_weights(
  path: str | os.PathLike, name: str, **create_kwargs
) -> tuple[regnet_lib.RegNet, dict[str, Any]]:
  """(model, variables) from a timm/DeiT RegNet checkpoint (.pth/.pt, .safetensors, .npz).

  ``num_classes`` defaults to the checkpoint's head width; other ``create_kwargs`` go to
  ``models.regnet.create_model`` (e.g. ``dtype``).
  """
  state = pytorch_lib.read_state_dict(path)
  if 'head.fc.weight' in state:
    create_kwargs.setdefault('num_classes', int(np.shape(state['head.fc.weight'])[0]))
  model = regnet_lib.create_model(name, **create_kwargs)
  return model, state_dict_to_variables(state, model, source=os.fspath(path))
