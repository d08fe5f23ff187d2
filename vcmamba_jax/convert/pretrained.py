"""Exported model directories and loading pretrained weights into a model of another geometry.

An exported model directory (written by ``save_pretrained`` / ``scripts/convert_weights.py``):

    DIR/model.json      {"name": "vcmamba_b", "model_kwargs": {"num_classes": 1000, "img_size": 224}}
    DIR/variables/      orbax checkpoint of {'params': ..., 'batch_stats': ...} (float32)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vcmamba_jax.convert import pytorch as pytorch_lib
from vcmamba_jax.models import vcmamba as vcmamba_lib

MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
_JSON_KWARGS = (
  'num_classes',
  'img_size',
  'depths',
  'widths',
  'num_mamba_layers',
  'scan_mode',
  'stem_activation',
)


def _model_kwargs(model: vcmamba_lib.VCMamba, name: str) -> dict[str, Any]:
  spec = vcmamba_lib.VARIANTS[name]
  kwargs = {'num_classes': model.num_classes, 'img_size': model.img_size}
  if tuple(model.depths) != spec.depths:
    kwargs['depths'] = list(model.depths)
  if tuple(model.widths) != spec.widths:
    kwargs['widths'] = list(model.widths)
  if model.num_mamba_layers != spec.num_mamba_layers:
    kwargs['num_mamba_layers'] = model.num_mamba_layers
  if model.scan_mode != 'upstream':
    kwargs['scan_mode'] = model.scan_mode
  if model.stem_activation != 'relu':
    kwargs['stem_activation'] = model.stem_activation
  return kwargs


def save_pretrained(
  directory: str | os.PathLike, variables: dict[str, Any], name: str, **model_kwargs
) -> str:
  """Writes an exported model directory that ``load_pretrained`` (and the trainer's
  ``init_from``, eval mode and ``scripts/predict.py``) read. Returns the directory."""
  import orbax.checkpoint as ocp

  directory = os.path.abspath(os.fspath(directory))
  model = vcmamba_lib.create_model(name, **model_kwargs)
  # Fail early (with the usual key/shape report) when variables and model disagree.
  pytorch_lib.state_dict_to_variables(
    pytorch_lib.to_pytorch_state_dict(variables, include_num_batches_tracked=False),
    model,
    source='variables',
  )
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, VARIABLES_DIR)
  tree = {
    c: jax.tree.map(lambda x: np.asarray(x, np.float32), variables[c])
    for c in ('params', 'batch_stats')
  }
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(target, tree, force=True)
  checkpointer.wait_until_finished()
  meta = {
    'name': name,
    'model_kwargs': _model_kwargs(model, name),
    'format': 'vcmamba_jax exported model v1',
  }
  tmp = os.path.join(directory, MODEL_JSON + '.tmp')
  with open(tmp, 'w') as f:
    json.dump(meta, f, indent=2)
  os.replace(tmp, os.path.join(directory, MODEL_JSON))
  return directory


def is_exported_model(path: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(os.fspath(path), MODEL_JSON))


def _read_exported(directory: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
  import orbax.checkpoint as ocp

  with open(os.path.join(directory, MODEL_JSON)) as f:
    meta = json.load(f)
  unknown = set(meta.get('model_kwargs', {})) - set(_JSON_KWARGS)
  if 'name' not in meta or unknown:
    raise pytorch_lib.CheckpointError(
      f'{directory}/{MODEL_JSON} is not a vcmamba_jax model '
      f'description (unknown fields {sorted(unknown)})'
    )
  checkpointer = ocp.StandardCheckpointer()
  tree = checkpointer.restore(os.path.join(os.path.abspath(directory), VARIABLES_DIR))
  variables = {c: jax.tree.map(jnp.asarray, tree[c]) for c in ('params', 'batch_stats')}
  return meta['name'], dict(meta['model_kwargs']), variables


def adapt_variables(
  variables: dict[str, Any],
  model: vcmamba_lib.VCMamba,
  *,
  reinit_heads: bool = False,
  rng: jax.Array | None = None,
) -> tuple[dict[str, Any], list[str]]:
  """Fits pretrained ``variables`` to ``model``.

  - pos_embed is resized bicubically when the model's grid (img_size) differs;
  - with ``reinit_heads``, ``head``/``dist_head`` whose class count differs are replaced by a
    fresh init of ``model`` (fine-tuning on another label set);
  - any other shape or structure difference is an error.

  Returns (variables, names of re-initialised variables).
  """
  size = max(model.img_size, 32)
  init = lambda: model.init(
    {'params': rng if rng is not None else jax.random.key(0)},
    jnp.zeros((1, size, size, 3)),
    train=False,
  )
  target = jax.eval_shape(init)
  fresh = None
  reinitialised = []
  out = {}
  for collection in ('params', 'batch_stats'):
    src = traverse_util.flatten_dict(variables[collection])
    dst = traverse_util.flatten_dict(target[collection])
    if set(src) != set(dst):
      diff = sorted('/'.join(p) for p in set(src) ^ set(dst))
      raise pytorch_lib.CheckpointError(
        f'pretrained {collection} do not match the model structure: {diff[:8]}'
      )
    flat = {}
    for path, leaf in dst.items():
      value = src[path]
      if tuple(value.shape) != tuple(leaf.shape):
        if path[-1] == 'pos_embed':
          value = vcmamba_lib.resize_pos_embed(jnp.asarray(value), leaf.shape[1:3])
        elif reinit_heads and path[0] in ('head', 'dist_head'):
          if fresh is None:
            fresh = traverse_util.flatten_dict(jax.jit(init)()[collection])
          value = fresh[path]
          reinitialised.append('/'.join(path))
        else:
          raise pytorch_lib.CheckpointError(
            f'{"/".join(path)}: pretrained shape {tuple(value.shape)} vs model '
            f'{tuple(leaf.shape)}'
            + (
              ' (pass reinit_heads=True to train a new head)'
              if path[0] in ('head', 'dist_head')
              else ''
            )
          )
      flat[path] = jnp.asarray(value, jnp.float32)
    out[collection] = traverse_util.unflatten_dict(flat)
  return out, reinitialised


def load_pretrained(
  path: str | os.PathLike, name: str | None = None, *, reinit_heads: bool = False, **overrides
):
  """Loads an exported model directory or a PyTorch-format file (.pth/.npz/.safetensors).

  Args:
    path: the directory or file.
    name: the variant; for PyTorch files it is detected from the tensors when omitted, for
      exported directories it is read from model.json (and checked when given).
    reinit_heads: re-initialise the heads when ``num_classes`` differs from the checkpoint.
    **overrides: ``create_model`` options, e.g. ``img_size=256`` (pos_embed is resized),
      ``num_classes=10`` (with reinit_heads), ``dtype=jnp.bfloat16``, ``drop_path_rate``.

  Returns:
    (model, variables).
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    if not is_exported_model(path):
      raise pytorch_lib.CheckpointError(
        f'{path} is a directory without {MODEL_JSON}: expected an exported model '
        '(scripts/convert_weights.py) or a PyTorch file'
      )
    stored_name, kwargs, variables = _read_exported(path)
    if name is not None and name != stored_name:
      raise pytorch_lib.CheckpointError(f'{path} holds a {stored_name} model, not {name}')
    name = stored_name
  else:
    state = pytorch_lib.read_state_dict(path)
    if name is None:
      name = pytorch_lib.guess_variant(state)
      if name is None:
        raise pytorch_lib.CheckpointError(
          f'{path}: could not recognise the VCMamba variant; pass name=...'
        )
    kwargs = pytorch_lib._checkpoint_geometry(state)
    model = vcmamba_lib.create_model(name, **kwargs)
    variables = pytorch_lib.state_dict_to_variables(state, model, source=path)
  kwargs.update(overrides)
  model = vcmamba_lib.create_model(name, **kwargs)
  variables, _ = adapt_variables(variables, model, reinit_heads=reinit_heads)
  return model, variables
