"""VCMamba models: the family, its layers and the selective scan."""

from vcmamba_jax.models.mamba import PlainMamba2D, PlainMambaLayer
from vcmamba_jax.models.scan import scan_tables, selective_scan
from vcmamba_jax.models.vcmamba import (
  VARIANTS,
  VCMamba,
  create_model,
  grid_size,
  list_models,
  resize_pos_embed,
  weight_decay_mask,
)

__all__ = [
  'VARIANTS',
  'PlainMamba2D',
  'PlainMambaLayer',
  'VCMamba',
  'create_model',
  'grid_size',
  'list_models',
  'resize_pos_embed',
  'scan_tables',
  'selective_scan',
  'weight_decay_mask',
]
