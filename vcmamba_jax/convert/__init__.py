"""Weights: PyTorch checkpoints <-> Flax variables, save_pretrained folders, Hugging Face Hub paths."""

from vcmamba_jax.convert import pytorch as _pytorch
from vcmamba_jax.convert import regnet as _regnet
from vcmamba_jax.convert.hub import HubError, HubPath, is_hub_path, parse_hub_path
from vcmamba_jax.convert.hub import resolve as resolve_hub_path
from vcmamba_jax.convert.pretrained import (
  adapt_variables,
  is_exported_model,
  load_pretrained,
  save_pretrained,
)
from vcmamba_jax.convert.pytorch import (
  CheckpointError,
  guess_variant,
  read_state_dict,
  state_dict_to_variables,
  to_pytorch_state_dict,
  torch_key,
)


def load_pytorch_weights(path, name: str, **create_kwargs):
  """(model, variables) from a PyTorch checkpoint of model ``name``: a VCMamba variant (the
  authors' weights; see ``convert.pytorch.load_pytorch_weights``) or a RegNet of timm's registry
  such as the DeiT teacher 'regnety_160' (``convert.regnet.load_pytorch_weights``).
  ``path`` may be a Hub path, e.g. 'hf-hub:timm/regnety_160.deit_in1k' (see ``convert.hub``)."""
  if is_hub_path(path):
    path = resolve_hub_path(path)
  if name in _regnet.regnet_lib.VARIANTS:
    return _regnet.load_pytorch_weights(path, name, **create_kwargs)
  return _pytorch.load_pytorch_weights(path, name, **create_kwargs)


__all__ = [
  'CheckpointError',
  'HubError',
  'HubPath',
  'adapt_variables',
  'guess_variant',
  'is_exported_model',
  'is_hub_path',
  'load_pretrained',
  'load_pytorch_weights',
  'parse_hub_path',
  'read_state_dict',
  'resolve_hub_path',
  'save_pretrained',
  'state_dict_to_variables',
  'to_pytorch_state_dict',
  'torch_key',
]
