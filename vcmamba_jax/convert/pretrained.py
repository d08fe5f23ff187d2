"""Exported model folders (save_pretrained), and fitting pretrained weights to a model of another
geometry (the loader itself, for every kind of source, is `convert/loader.py`).

A folder written by ``save_pretrained`` (and ``scripts/convert_weights.py``) is ready to upload to
the Hugging Face Hub as it is (``hf upload USER/REPO DIR``) and loads back from there with
``load_pretrained('hf-hub:USER/REPO')``:

    DIR/model.safetensors  the weights under the authors' PyTorch names and layouts (float32), so
                           the same file also loads in their code
    DIR/config.json        {"library_name": "vcmamba_jax", "architecture": "vcmamba_b",
                            "model_kwargs": {"num_classes": 1000, "img_size": 224}, ...}
    DIR/README.md          a model card (usage, geometry, preprocessing)

Folders of the earlier format (model.json + an orbax ``variables/`` checkpoint) still load.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import safetensors.numpy
from flax import traverse_util

from vcmamba_jax.convert import hub as hub_lib
from vcmamba_jax.convert import pytorch as pytorch_lib
from vcmamba_jax.models import vcmamba as vcmamba_lib

CONFIG_JSON = hub_lib.CONFIG_NAME
WEIGHTS_FILE = hub_lib.WEIGHT_NAMES[0]
MODEL_CARD = 'README.md'
FORMAT_VERSION = 2
# Format 1 (read only): model.json + orbax variables/.
MODEL_JSON = 'model.json'
VARIABLES_DIR = 'variables'
# The architecture fields an exported folder records (defaults of the variant omitted).
EXPORTED_FIELDS = (
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


def _model_card(
  name: str, kwargs: dict[str, Any], num_params: int, repo_id: str | None, description: str
) -> str:
  repo = repo_id or 'USER/REPO'
  size = kwargs['img_size']
  return f"""---
library_name: vcmamba_jax
pipeline_tag: image-classification
tags:
- image-classification
- jax
- flax
- vcmamba
- mamba
---

# {name}: {kwargs['num_classes']} classes at {size} px

VCMamba (convolutions + multi-directional Mamba, [arXiv 2509.04669](https://arxiv.org/abs/2509.04669))
weights for [vcmamba_jax](https://github.com/), the JAX / Flax port. {num_params:,} parameters.
{description}

## Use

```python
import jax, vcmamba_jax
from vcmamba_jax.data import eval_preprocess, normalize
from PIL import Image

model, variables = vcmamba_jax.load_pretrained('hf-hub:{repo}')
image = eval_preprocess(Image.open('image.jpg'), {size})  # uint8 [{size}, {size}, 3]
logits, out = jax.jit(model.apply)(variables, normalize(image[None]))
```

Preprocessing (evaluation): resize the shorter side to int({size} / 0.875) (bicubic), centre crop
{size}, ImageNet mean/std. `logits` is the mean of the two heads.

## Files

- `model.safetensors`: the weights under the PyTorch names and layouts of the authors' code
  (float32), which also loads there.
- `config.json`: the variant and its options (`vcmamba_jax.create_model('{name}', **model_kwargs)`).

Upload this folder with `hf upload {repo} .` (huggingface_hub's CLI).
"""


def save_pretrained(
  directory: str | os.PathLike,
  variables: dict[str, Any],
  name: str,
  *,
  repo_id: str | None = None,
  description: str = '',
  **model_kwargs,
) -> str:
  """Writes a folder to upload to the Hub (model.safetensors, config.json, README.md) that
  ``load_pretrained`` (the folder, or 'hf-hub:REPO' once uploaded), the trainer's ``init_from``
  and ``scripts/predict.py`` read.

  Args:
    directory: the folder (created; existing files of these names are replaced).
    variables: {'params', 'batch_stats'} of ``create_model(name, **model_kwargs)``.
    name: the variant, e.g. 'vcmamba_b'.
    repo_id: the Hub repository it is meant for ('user/repo'), used in the model card.
    description: a paragraph for the model card (e.g. the data and accuracy of a fine-tune).
    **model_kwargs: ``create_model`` options of the architecture (num_classes, img_size, ...).

  Returns:
    The absolute directory.
  """
  directory = os.path.abspath(os.fspath(directory))
  model = vcmamba_lib.create_model(name, **model_kwargs)
  state = pytorch_lib.to_pytorch_state_dict(variables, include_num_batches_tracked=False)
  # Fail early (with the usual key/shape report) when variables and model disagree.
  pytorch_lib.state_dict_to_variables(state, model, source='variables')
  kwargs = _model_kwargs(model, name)
  os.makedirs(directory, exist_ok=True)
  num_params = vcmamba_lib.num_params(variables['params'])
  config = {
    'library_name': hub_lib.LIBRARY_NAME,
    'format_version': FORMAT_VERSION,
    'architecture': name,
    'model_kwargs': kwargs,
    'num_params': num_params,
    'preprocessing': {
      'input_size': [kwargs['img_size'], kwargs['img_size'], 3],
      'crop_pct': 0.875,
      'interpolation': 'bicubic',
      'mean': [0.485, 0.456, 0.406],
      'std': [0.229, 0.224, 0.225],
    },
  }
  tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}
  files = {
    WEIGHTS_FILE: lambda p: safetensors.numpy.save_file(tensors, p, metadata={'format': 'pt'}),
    CONFIG_JSON: lambda p: _write_text(p, json.dumps(config, indent=2) + '\n'),
    MODEL_CARD: lambda p: _write_text(
      p, _model_card(name, kwargs, num_params, repo_id, description)
    ),
  }
  for filename, write in files.items():  # each file appears whole or not at all
    tmp = os.path.join(directory, filename + '.tmp')
    write(tmp)
    os.replace(tmp, os.path.join(directory, filename))
  return directory


def _write_text(path: str, text: str) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


def is_exported_model(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a folder written by ``save_pretrained`` (either format)."""
  path = os.fspath(path)
  return hub_lib.is_vcmamba_config(os.path.join(path, CONFIG_JSON)) or os.path.isfile(
    os.path.join(path, MODEL_JSON)
  )


def read_exported_config(directory: str) -> tuple[str, dict[str, Any]]:
  """(variant, create_model kwargs) of a save_pretrained folder."""
  if hub_lib.is_vcmamba_config(os.path.join(directory, CONFIG_JSON)):
    with open(os.path.join(directory, CONFIG_JSON)) as f:
      meta = json.load(f)
    name = meta.get('architecture')
  else:
    with open(os.path.join(directory, MODEL_JSON)) as f:
      meta = json.load(f)
    name = meta.get('name')
  kwargs = meta.get('model_kwargs', {})
  unknown = set(kwargs) - set(EXPORTED_FIELDS)
  if name not in vcmamba_lib.VARIANTS or unknown:
    raise pytorch_lib.CheckpointError(
      f'{directory} does not describe a vcmamba_jax model (architecture {name!r}, unknown '
      f'fields {sorted(unknown)}); was it written by save_pretrained?'
    )
  return name, dict(kwargs)


def read_exported(directory: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
  """(variant, create_model kwargs, variables) of a save_pretrained folder (either format)."""
  name, kwargs = read_exported_config(directory)
  if hub_lib.is_vcmamba_config(os.path.join(directory, CONFIG_JSON)):
    weights = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(weights):
      raise pytorch_lib.CheckpointError(
        f'{directory} has {CONFIG_JSON} but no {WEIGHTS_FILE}: the folder is incomplete '
        '(re-run save_pretrained / scripts/convert_weights.py, or download it again)'
      )
    model = vcmamba_lib.create_model(name, **kwargs)
    try:
      state = pytorch_lib.read_state_dict(weights)
    except pytorch_lib.CheckpointError as e:
      raise pytorch_lib.CheckpointError(f'{e}; {_fix_for(directory)}') from None
    return name, kwargs, pytorch_lib.state_dict_to_variables(state, model, source=weights)
  return _read_orbax_format(directory)


def _fix_for(directory: str) -> str:
  return (
    'export it again (python scripts/convert_weights.py --input=<the original weights> '
    f'--output={directory} --overwrite) or download it again'
  )


def _unreadable_file(variables_dir: str, error: Exception) -> str:
  """The file of an orbax directory that `error` is about, in a few words (tensorstore reports
  pages of JSON specs)."""
  for name in ('_METADATA', 'manifest.ocdbt'):
    if not os.path.exists(os.path.join(variables_dir, name)):
      return f'{VARIABLES_DIR}/{name} is missing'
  text = str(error)
  for root, _, names in os.walk(variables_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), variables_dir)
      if rel in text:
        return f'{VARIABLES_DIR}/{rel} cannot be read'
  lines = text.strip().splitlines()
  return f'{VARIABLES_DIR} cannot be read ({lines[0][:200] if lines else type(error).__name__})'


def _read_orbax_format(directory: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
  with open(os.path.join(directory, MODEL_JSON)) as f:
    meta = json.load(f)
  unknown = set(meta.get('model_kwargs', {})) - set(EXPORTED_FIELDS)
  if 'name' not in meta or unknown:
    raise pytorch_lib.CheckpointError(
      f'{directory}/{MODEL_JSON} is not a vcmamba_jax model '
      f'description (unknown fields {sorted(unknown)})'
    )
  target = os.path.join(os.path.abspath(directory), VARIABLES_DIR)
  try:
    tree = ocp.StandardCheckpointer().restore(target)
  except Exception as e:
    raise pytorch_lib.CheckpointError(
      f'{directory} is damaged or incomplete: {_unreadable_file(target, e)}; ' + _fix_for(directory)
    ) from None
  variables = {c: jax.tree.map(jnp.asarray, tree[c]) for c in ('params', 'batch_stats')}
  return meta['name'], dict(meta['model_kwargs']), variables


def _fresh_heads(init, collection: str, src: dict, dst: dict) -> dict[tuple[str, ...], Any]:
  """A fresh init of the head/dist_head leaves whose shape differs from the pretrained ones.

  Only those leaves are outputs, so XLA drops the rest of the model's initialisers before
  compiling: seconds instead of the whole init program's compile (tens of seconds on a CPU).
  """
  paths = [
    path
    for path, leaf in dst.items()
    if path[0] in ('head', 'dist_head') and tuple(src[path].shape) != tuple(leaf.shape)
  ]

  def heads():
    flat = traverse_util.flatten_dict(init()[collection])
    return [flat[path] for path in paths]

  return dict(zip(paths, jax.jit(heads)()))


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
  target = vcmamba_lib.abstract_variables(model)
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
            fresh = _fresh_heads(init, collection, src, dst)
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
