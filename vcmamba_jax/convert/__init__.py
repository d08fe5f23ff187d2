"""Weights in and out: one loader for every source (`load_pretrained`, `read_weights`: training
checkpoints, save_pretrained folders, PyTorch files, Hugging Face Hub paths), PyTorch checkpoints
<-> Flax variables, save_pretrained folders."""

from vcmamba_jax.convert.hub import HubError, HubPath, is_hub_path, parse_hub_path
from vcmamba_jax.convert.hub import resolve as resolve_hub_path
from vcmamba_jax.convert.loader import (
  READERS,
  Weights,
  load_pretrained,
  load_pytorch_weights,
  read_weights,
  source_kind,
)
from vcmamba_jax.convert.pretrained import (
  adapt_variables,
  is_exported_model,
  read_exported,
  save_pretrained,
)
from vcmamba_jax.convert.pytorch import (
  CheckpointError,
  checkpoint_geometry,
  guess_variant,
  read_state_dict,
  state_dict_to_variables,
  to_pytorch_state_dict,
  torch_key,
)

__all__ = [
  'READERS',
  'CheckpointError',
  'HubError',
  'HubPath',
  'Weights',
  'adapt_variables',
  'checkpoint_geometry',
  'guess_variant',
  'is_exported_model',
  'is_hub_path',
  'load_pretrained',
  'load_pytorch_weights',
  'parse_hub_path',
  'read_exported',
  'read_state_dict',
  'read_weights',
  'resolve_hub_path',
  'save_pretrained',
  'source_kind',
  'state_dict_to_variables',
  'to_pytorch_state_dict',
  'torch_key',
]
