"""The one way weights come in: `load_pretrained(source, name=None, ...)` and `read_weights`.

Every program that takes weights (the trainer's `init_from` and eval mode, `scripts/predict.py`,
`scripts/convert_weights.py`, the notebook) calls these. A source is one of (`source_kind`):

    'checkpoint'  one of our training runs: a workdir, its checkpoints/ directory or a step
                  directory (orbax); raw weights and, if the run kept one, the EMA
    'exported'    a directory written by `save_pretrained` (model.json + variables/)
    'pytorch'     a file in the authors' format: .pth/.pt/.bin/.ckpt (needs torch), .npz or
                  .safetensors, a raw state_dict or a training checkpoint dict holding one
    'hf-hub'      'hf-hub:owner/name[/file][@revision]': a Hub file or uploaded exported folder,
                  resolved into the Hugging Face cache (`convert.hub`), then read as above

Each kind has a reader in `READERS` (source, name) -> `Weights`; a new kind of source is a reader
plus a rule in `source_kind`. What is read is then fitted to the model that is asked for
(`adapt_variables`: pos_embed resized, heads re-initialised on request). Model families: VCMamba
variants, and RegNets of timm's registry (the DeiT teacher 'regnety_160', PyTorch files only,
loaded strictly).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from vcmamba_jax import checkpoint as checkpoint_lib
from vcmamba_jax.convert import hub as hub_lib
from vcmamba_jax.convert import pretrained as pretrained_lib
from vcmamba_jax.convert import pytorch as pytorch_lib
from vcmamba_jax.convert import regnet as regnet_convert
from vcmamba_jax.models import regnet as regnet_lib
from vcmamba_jax.models import vcmamba as vcmamba_lib

CheckpointError = pytorch_lib.CheckpointError
PYTORCH_SUFFIXES = ('.pth', '.pt', '.bin', '.ckpt', '.npz', '.safetensors')


@dataclasses.dataclass(frozen=True)
class Weights:
  """Weights as read from a source, before they are fitted to a model.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...} in our Flax layout, float32 host arrays.
    name: the registered variant ('vcmamba_b', ...).
    model_kwargs: `create_model` options the weights were made for (num_classes, img_size and
      any architecture override), as recorded by or implied by the source.
    ema: the EMA weights of a training checkpoint (same layout), else None.
    description: what was read, for logs.
    step: the training step of a checkpoint, else None.
  """

  variables: dict[str, Any]
  name: str
  model_kwargs: dict[str, Any]
  ema: dict[str, Any] | None = None
  description: str = ''
  step: int | None = None


# ------------------------------------------------------------------------------------------------
# Source kinds and their readers.
# ------------------------------------------------------------------------------------------------


def source_kind(source: str | os.PathLike) -> str:
  """'checkpoint', 'exported', 'pytorch' or 'hf-hub' (see the module docstring); an error naming
  what was expected otherwise."""
  path = os.fspath(source)
  if hub_lib.is_hub_path(path):
    return 'hf-hub'
  if os.path.isdir(path):
    if pretrained_lib.is_exported_model(path):
      return 'exported'
    if checkpoint_lib.find_training_checkpoint(path) is not None:
      return 'checkpoint'
    raise CheckpointError(
      f'{path} is a directory but neither a training run (no checkpoints/<step>) nor an '
      f'exported model (no vcmamba_jax {pretrained_lib.CONFIG_JSON}): pass a workdir, a '
      'checkpoint step directory, a save_pretrained folder (scripts/convert_weights.py) or a '
      'PyTorch file'
    )
  if os.path.isfile(path):
    suffix = os.path.splitext(path)[1].lower()
    if suffix in PYTORCH_SUFFIXES:
      return 'pytorch'
    raise CheckpointError(
      f'unsupported weights file {path}: expected one of {", ".join(PYTORCH_SUFFIXES)}'
    )
  raise FileNotFoundError(f'no weights at {path}: no such file or directory')


def _detect_name(state_dict: dict[str, Any], source: str) -> str:
  name = pytorch_lib.guess_variant(state_dict)
  if name is None:
    raise CheckpointError(f'{source}: could not recognise the VCMamba variant; pass name=...')
  return name


def _is_regnet(name: str | None) -> bool:
  return name in regnet_lib.VARIANTS


def _read_pytorch(source: str, name: str | None) -> Weights:
  state = pytorch_lib.read_state_dict(source)
  if _is_regnet(name):
    kwargs = {}
    if 'head.fc.weight' in state:
      kwargs['num_classes'] = int(np.shape(state['head.fc.weight'])[0])
    model = regnet_lib.create_model(name, **kwargs)
    variables = regnet_convert.state_dict_to_variables(state, model, source=source)
    return Weights(variables, name, kwargs, description=f'pretrained weights {source}')
  name = name or _detect_name(state, source)
  kwargs = pytorch_lib.checkpoint_geometry(state)
  model = vcmamba_lib.create_model(name, **kwargs)
  variables = pytorch_lib.state_dict_to_variables(state, model, source=source)
  return Weights(variables, name, kwargs, description=f'pretrained weights {source}')


def _read_exported(source: str, name: str | None) -> Weights:
  stored_name, kwargs, variables = pretrained_lib.read_exported(source)
  if name is not None and name != stored_name:
    raise CheckpointError(f'{source} holds a {stored_name} model, not {name}')
  return Weights(variables, stored_name, kwargs, description=f'pretrained weights {source}')


def _run_model_config(checkpoints_dir: str) -> dict[str, Any]:
  """`model` fields of the run's config.json (the workdir above checkpoints/), or {}."""
  path = os.path.join(os.path.dirname(checkpoints_dir), 'config.json')
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f).get('model', {})


def _read_checkpoint(source: str, name: str | None) -> Weights:
  directory, step = checkpoint_lib.find_training_checkpoint(source)
  step_dir = os.path.join(directory, str(step))
  problem = checkpoint_lib.verify_step(step_dir) if checkpoint_lib.has_manifest(step_dir) else None
  if problem is not None:
    raise checkpoint_lib.CheckpointDamagedError(
      f'checkpoint {step_dir} is damaged: {problem}. Pass an intact step directory instead, '
      f'e.g. --config.eval_from={directory}/<step>'
    )
  tree = checkpoint_lib.read_training_weights(step_dir)
  variables = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
  state = pytorch_lib.to_pytorch_state_dict(variables)
  recorded = _run_model_config(directory).get('name')
  if name is not None and recorded is not None and name != recorded:
    raise CheckpointError(f'{source} holds a {recorded} model, not {name}')
  name = name or recorded or _detect_name(state, source)
  kwargs = pytorch_lib.checkpoint_geometry(state)
  return Weights(
    variables,
    name,
    kwargs,
    ema=tree.get('ema') or None,
    description=f'checkpoint {directory}/{step}',
    step=step,
  )


def _read_hub(source: str, name: str | None) -> Weights:
  weights = read_weights(hub_lib.resolve(source), name)
  return dataclasses.replace(weights, description=f'pretrained weights {source}')


READERS: dict[str, Callable[[str, str | None], Weights]] = {
  'checkpoint': _read_checkpoint,
  'exported': _read_exported,
  'pytorch': _read_pytorch,
  'hf-hub': _read_hub,
}


def read_weights(source: str | os.PathLike, name: str | None = None) -> Weights:
  """Reads the weights of any source kind, unfitted (see `load_pretrained`).

  Args:
    source: a training run, an exported model directory or a PyTorch-format file.
    name: the variant. Checked against exported directories; used to map PyTorch files
      (detected from the tensors when omitted); read from the run's config for checkpoints.
  """
  source = os.fspath(source)
  return READERS[source_kind(source)](source, name)


# ------------------------------------------------------------------------------------------------
# Fitted to a model.
# ------------------------------------------------------------------------------------------------


def load_pretrained(
  source: str | os.PathLike,
  name: str | None = None,
  *,
  reinit_heads: bool = False,
  use_ema: bool = False,
  **overrides,
):
  """Loads weights from any source into a model (the one entry point for pretrained weights).

  Args:
    source: one of our training runs (workdir, checkpoints dir or step dir), an exported model
      directory, or a PyTorch-format file (.pth/.pt/.npz/.safetensors).
    name: the variant; detected (PyTorch files), recorded (exported directories, the run's
      config.json) or checked when given.
    reinit_heads: re-initialise the heads when ``num_classes`` differs from the source's.
    use_ema: the EMA weights of a training checkpoint instead of the raw ones (an error for a
      source without an EMA).
    **overrides: ``create_model`` options, e.g. ``img_size=256`` (pos_embed is resized),
      ``num_classes=10`` (with reinit_heads), ``dtype=jnp.bfloat16``, ``drop_path_rate``.

  Returns:
    (model, variables) with ``variables = {'params': ..., 'batch_stats': ...}`` (float32).
  """
  weights = read_weights(source, name)
  variables = weights.variables
  if use_ema:
    if weights.ema is None:
      raise CheckpointError(f'{weights.description} has no EMA weights; pass use_ema=False')
    variables = weights.ema
  kwargs = {**weights.model_kwargs, **overrides}
  if _is_regnet(weights.name):
    model = regnet_lib.create_model(weights.name, **kwargs)
    _check_same_shapes(variables, regnet_convert.abstract_variables(model), weights.description)
    return model, variables
  model = vcmamba_lib.create_model(weights.name, **kwargs)
  variables, _ = pretrained_lib.adapt_variables(variables, model, reinit_heads=reinit_heads)
  return model, variables


def _check_same_shapes(variables: Any, target: Any, description: str) -> None:
  got = jax.tree.map(np.shape, variables)
  want = jax.tree.map(lambda leaf: tuple(leaf.shape), target)
  if got != want:
    raise CheckpointError(
      f'{description} does not fit the requested model (RegNets are loaded as they are: pass '
      'no num_classes or other geometry than the checkpoint has)'
    )


def load_pytorch_weights(path: str | os.PathLike, name: str, **create_kwargs):
  """(model, variables) from a PyTorch checkpoint of model ``name``, strictly: a VCMamba variant
  (the authors' weights; ``img_size``/``num_classes`` default to the checkpoint's) or a RegNet of
  timm's registry such as the DeiT teacher 'regnety_160'. ``path`` may be an 'hf-hub:' path."""
  path = os.fspath(path)
  if hub_lib.is_hub_path(path):
    path = hub_lib.resolve(path)
  if _is_regnet(name):
    return regnet_convert.load_pytorch_weights(path, name, **create_kwargs)
  return pytorch_lib.load_pytorch_weights(path, name, **create_kwargs)
