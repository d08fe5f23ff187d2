"""Weight conversion: PyTorch checkpoints <-> Flax variables, exported model directories."""

from vcmamba_jax.convert import pytorch as _pytorch
from vcmamba_jax.convert import regnet as _regnet
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
  such as the DeiT teacher 'regnety_160' (``convert.regnet.load_pytorch_weights``)."""
  if name in _regnet.regnet_lib.VARIANTS:
    return _regnet.load_pytorch_weights(path, name, **create_kwargs)
  return _pytorch.load_pytorch_weights(path, name, **create_kwargs)


__all__ = [
  'CheckpointError',
  'adapt_variables',
  'guess_variant',
  'is_exported_model',
  'load_pretrained',
  'load_pytorch_weights',
  'read_state_dict',
  'save_pretrained',
  'state_dict_to_variables',
  'to_pytorch_state_dict',
  'torch_key',
]
