"""Weight conversion: PyTorch checkpoints <-> Flax variables, exported model directories."""

from vcmamba_jax.convert.pretrained import (
  adapt_variables,
  is_exported_model,
  load_pretrained,
  save_pretrained,
)
from vcmamba_jax.convert.pytorch import (
  CheckpointError,
  guess_variant,
  load_pytorch_weights,
  read_state_dict,
  state_dict_to_variables,
  to_pytorch_state_dict,
  torch_key,
)

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
