"""vcmamba_jax: VCMamba in JAX/Flax (linen).

Names are imported lazily so that light subpackages (e.g. the input pipeline in grain worker
processes) do not pay for importing the models and their dependencies.
"""

import importlib

__version__ = '0.1.0'

_EXPORTS = {
  'create_model': 'vcmamba_jax.convert.registry',
  'list_models': 'vcmamba_jax.convert.registry',
  'pretrained_weights': 'vcmamba_jax.convert.registry',
  'load_pytorch_weights': 'vcmamba_jax.convert',
  'to_pytorch_state_dict': 'vcmamba_jax.convert',
  'load_pretrained': 'vcmamba_jax.convert',
  'load_exported': 'vcmamba_jax.serving',
  'save_pretrained': 'vcmamba_jax.convert',
  'load_segmentation_weights': 'vcmamba_jax.segmentation',
  'create_segmentation_model': 'vcmamba_jax.segmentation',
}


# Subpackages, imported on first attribute access (`vcmamba_jax.train.run(...)` after a bare
# `import vcmamba_jax`, as main.py does).
_SUBPACKAGES = ('checkpoint', 'configs', 'convert', 'data', 'models', 'segmentation', 'train')


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  if name in _SUBPACKAGES:
    return importlib.import_module(f'vcmamba_jax.{name}')
  raise AttributeError(f"module 'vcmamba_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS) + ['__version__']
