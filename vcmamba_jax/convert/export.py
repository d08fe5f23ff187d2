"""Export the eval forward of a VCMamba as a portable ``jax.export`` artifact (see
``vcmamba_jax.serving`` for the format and the loader).

The program is lowered once for several platforms (default cpu, cuda and tpu) with a symbolic
batch dimension, with the pure-XLA ``associative`` scan: the fused Pallas kernels are GPU
custom calls that do not serialise portably. Weights are program inputs, stored beside it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax import serving
from vcmamba_jax.data import device_ops, transforms
from vcmamba_jax.models import vcmamba as vcmamba_lib

DEFAULT_PLATFORMS = ('cpu', 'cuda', 'tpu')


def _write_bytes(data: bytes | str) -> Callable[[str], None]:
  def write(path: str) -> None:
    with open(path, 'wb') as f:
      f.write(data.encode() if isinstance(data, str) else data)

  return write


def _write(path: str, write: Callable[[str], None]) -> dict[str, Any]:
  tmp = path + '.tmp'
  write(tmp)
  os.replace(tmp, path)
  return {'bytes': os.path.getsize(path), 'sha256': serving.sha256_of(path)}


def export_model(
  model: vcmamba_lib.VCMamba,
  variables: dict[str, Any],
  directory: str | os.PathLike,
  *,
  platforms: Sequence[str] = DEFAULT_PLATFORMS,
  crop_pct: float = transforms.DEFAULT_CROP_PCT,
  source: str = '',
  log: Callable[[str], None] = lambda message: None,
) -> str:
  """Writes an export directory of ``model``'s eval forward with ``variables``.

  Args:
    model: the VCMamba (its img_size is the input size; its dtype the compute dtype).
    variables: {'params', 'batch_stats'}.
    directory: the output directory (created; its export files are replaced).
    platforms: jax.export platforms to lower for.
    crop_pct: recorded in the metadata (the eval preprocessing the crops should get).
    source: where the weights came from, for the metadata.
    log: receives one line per stage (progress).

  Returns:
    The absolute directory.
  """
  directory = os.path.abspath(os.fspath(directory))
  platforms = serving.platforms_list(platforms)
  model = model.clone(scan_impl='associative')  # no Pallas custom calls in a portable program
  size = model.img_size
  leaves, treedef = jax.tree.flatten({c: variables[c] for c in ('params', 'batch_stats')})
  leaves = [np.asarray(leaf, np.float32) for leaf in leaves]

  def forward(weights: list[jax.Array], images: jax.Array) -> jax.Array:
    tree = jax.tree.unflatten(treedef, weights)
    logits, _ = model.apply(tree, device_ops.normalize(images, model.dtype), train=False)
    return logits.astype(jnp.float32)

  (batch,) = jax.export.symbolic_shape('batch')
  args = (
    [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves],
    jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8),
  )
  start = time.perf_counter()
  log(f'tracing and lowering the eval forward for {", ".join(platforms)} ...')
  exported = jax.export.export(jax.jit(forward), platforms=platforms)(*args)
  program = exported.serialize()
  log(f'lowered in {time.perf_counter() - start:.1f} s ({len(program) / 2**20:.1f} MiB program)')

  os.makedirs(directory, exist_ok=True)
  files = {
    serving.PROGRAM_FILE: _write(
      os.path.join(directory, serving.PROGRAM_FILE), _write_bytes(bytes(program))
    ),
  }

  def save_weights(path: str) -> None:
    with open(path, 'wb') as f:  # np.savez on a file object: no '.npz' appended to the name
      np.savez(f, **{f'{i:06d}': leaf for i, leaf in enumerate(leaves)})

  files[serving.WEIGHTS_FILE] = _write(os.path.join(directory, serving.WEIGHTS_FILE), save_weights)
  num_params = sum(int(leaf.size) for leaf in leaves)
  log(f'wrote {len(leaves)} weight arrays ({num_params:,} values)')
  name = next(
    (
      n
      for n, spec in vcmamba_lib.VARIANTS.items()
      if (spec.depths, spec.widths) == (tuple(model.depths), tuple(model.widths))
    ),
    'VCMamba',
  )
  metadata = {
    'format': serving.FORMAT,
    'model': name,
    'source': source,
    'num_classes': model.num_classes,
    'compute_dtype': jnp.dtype(model.dtype).name,
    'platforms': list(platforms),
    'input': {
      'shape': ['batch', size, size, 3],
      'dtype': 'uint8',
      'preprocessing': {
        'resize_shorter_side': transforms.eval_resize_size(size, crop_pct),
        'interpolation': 'bicubic',
        'center_crop': size,
        'normalisation': 'inside the program (ImageNet mean/std)',
      },
    },
    'output': {'shape': ['batch', model.num_classes], 'dtype': 'float32', 'name': 'logits'},
    'jax_version': jax.__version__,
    'serialization_version': exported.calling_convention_version,
    'files': files,
  }
  _write(
    os.path.join(directory, serving.METADATA_FILE),
    _write_bytes(json.dumps(metadata, indent=2) + '\n'),
  )
  log(f'wrote {directory}')
  return directory


def export_onnx(
  model: vcmamba_lib.VCMamba,
  variables: dict[str, Any],
  path: str | os.PathLike,
  *,
  log: Callable[[str], None] = lambda message: None,
) -> str:
  """Writes the eval forward as ONNX through jax2onnx (optional: `pip install jax2onnx
  onnxruntime`; it is not a dependency of this package).

  Input 'images': float32 [B, S, S, 3] pixel values in 0..255 (the uint8 crops, cast),
  normalised inside; output: float32 logits [B, num_classes]. The scan is the sequential one
  (lax.scan, an ONNX Loop): jax2onnx cannot convert associative_scan's interior padding.
  Measured with jax2onnx 0.17.1 / onnxruntime on vcmamba_nano: logits within 3e-8 of JAX.
  """
  try:
    from jax2onnx import to_onnx
  except ImportError as e:
    raise ImportError(
      'ONNX export needs jax2onnx (not a dependency of vcmamba_jax): pip install jax2onnx '
      'onnxruntime; or serve the jax.export artifact with vcmamba_jax.load_exported'
    ) from e
  import onnx

  path = os.fspath(path)
  model = model.clone(scan_impl='sequential')
  weights = jax.tree.map(np.asarray, {c: variables[c] for c in ('params', 'batch_stats')})
  size = model.img_size

  def forward(images: jax.Array) -> jax.Array:
    logits, _ = model.apply(weights, device_ops.normalize(images, model.dtype), train=False)
    return logits.astype(jnp.float32)

  start = time.perf_counter()
  log('converting the eval forward to ONNX with jax2onnx ...')
  proto = to_onnx(forward, [('B', size, size, 3)], model_name='vcmamba')
  onnx.save(proto, path)
  log(f'wrote {path} in {time.perf_counter() - start:.1f} s')
  return path
