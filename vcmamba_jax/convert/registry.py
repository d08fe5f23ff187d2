"""The user-facing model registry: `create_model(name, pretrained=True)`, `list_models`.

The models package builds architectures only (it knows nothing about files); this module adds the
official weights on the Hugging Face Hub, so that `vcmamba_jax.create_model('vcmamba_b',
pretrained=True)` works as in timm. Flax modules hold no weights, so with `pretrained` the call
returns `(model, variables)`.
"""

from __future__ import annotations

import fnmatch
import os
from typing import Any

from absl import logging

from vcmamba_jax import convert, models

# ImageNet-1k checkpoints (224 px, 1000 classes): the authors' VCMambas and DeiT's RegNetY-160
# teacher as timm publishes it.
PRETRAINED_WEIGHTS = {
  'vcmamba_s': 'hf-hub:SLDGroup/VCMamba/VCMamba-S.pth',
  'vcmamba_m': 'hf-hub:SLDGroup/VCMamba/VCMamba-M.pth',
  'vcmamba_b': 'hf-hub:SLDGroup/VCMamba/VCMamba-B.pth',
  'regnety_160': 'hf-hub:timm/regnety_160.deit_in1k',
}


def pretrained_weights(name: str) -> str:
  """The Hub path of the official weights of ``name``, e.g. 'hf-hub:SLDGroup/VCMamba/VCMamba-B.pth'."""
  if name not in PRETRAINED_WEIGHTS:
    raise ValueError(
      f'no official weights for {name!r}; models with weights: {sorted(PRETRAINED_WEIGHTS)} '
      "(others: pass pretrained='hf-hub:...' or a local file)"
    )
  return PRETRAINED_WEIGHTS[name]


def list_models(pattern: str = '*', *, pretrained: bool = False) -> list[str]:
  """Registered model names matching the shell-style ``pattern`` ('vcmamba_*'); with
  ``pretrained``, only those with official weights."""
  names = PRETRAINED_WEIGHTS if pretrained else models.list_models()
  return sorted(fnmatch.filter(names, pattern))


def create_model(name: str, *, pretrained: bool | str | os.PathLike = False, **kwargs) -> Any:
  """Builds a model, optionally with pretrained weights.

  Args:
    name: 'vcmamba_s', 'vcmamba_m', 'vcmamba_b', 'regnety_160', ... (``list_models()``).
    pretrained: False: the architecture alone (``vcmamba_jax.models.create_model``). True: the
      official weights of ``name`` from the Hub (downloaded once into the Hugging Face cache;
      HF_HUB_OFFLINE=1 reads only the cache). A path or 'hf-hub:...' string: those weights.
    **kwargs: ``create_model`` options. ``img_size`` other than the weights' resizes pos_embed;
      ``num_classes`` other than the weights' re-initialises both heads (a new label set;
      VCMamba only).

  Returns:
    ``model`` without ``pretrained``, else ``(model, variables)``.
  """
  if not pretrained:
    return models.create_model(name, **kwargs)
  source = pretrained_weights(name) if pretrained is True else os.fspath(pretrained)
  reinit_heads = name not in models.regnet.VARIANTS  # RegNets load strictly, as they are
  model, variables = convert.load_pretrained(source, name, reinit_heads=reinit_heads, **kwargs)
  logging.info('%s: weights from %s', name, source)
  return model, variables
