"""VCMamba models: the family, its layers and the selective scan; RegNet (the DeiT teacher)."""

from vcmamba_jax.models import regnet, vcmamba
from vcmamba_jax.models.mamba import PlainMamba2D, PlainMambaLayer
from vcmamba_jax.models.scan import scan_tables, selective_scan
from vcmamba_jax.models.vcmamba import (
  VARIANTS,
  VCMamba,
  abstract_variables,
  grid_size,
  num_params,
  resize_pos_embed,
  variant_name,
  weight_decay_mask,
)


def create_model(name: str, **kwargs):
  """A registered model by name: a VCMamba variant (``models.vcmamba.create_model``) or a RegNet
  such as the distillation teacher 'regnety_160' (``models.regnet.create_model``)."""
  if name in regnet.VARIANTS:
    return regnet.create_model(name, **kwargs)
  return vcmamba.create_model(name, **kwargs)


def list_models() -> list[str]:
  """Every registered name: the VCMamba variants, then the RegNets."""
  return vcmamba.list_models() + regnet.list_models()


__all__ = [
  'VARIANTS',
  'PlainMamba2D',
  'PlainMambaLayer',
  'VCMamba',
  'abstract_variables',
  'create_model',
  'grid_size',
  'list_models',
  'num_params',
  'resize_pos_embed',
  'scan_tables',
  'selective_scan',
  'variant_name',
  'weight_decay_mask',
]
