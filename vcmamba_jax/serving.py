"""Run an exported VCMamba (``scripts/export.py``) with JAX alone: no Flax, no model code.

An export directory holds the eval forward as a serialised ``jax.export`` program and its weights:

    DIR/export.json          what it is: platforms, input/output shapes and dtypes, the
                             preprocessing, the model it came from, and a sha256 of every file
    DIR/forward.jax_export   ``jax.export.Exported.serialize()`` of
                             ``(weights: list[array], images: uint8 [batch, S, S, 3]) -> logits
                             float32 [batch, num_classes]`` (normalisation inside), with a
                             symbolic batch dimension
    DIR/weights.npz          the weights list, as arrays '000000', '000001', ...

    model = vcmamba_jax.load_exported('export_dir')
    logits = model(images)  # uint8 [B, S, S, 3], any B

This module imports only jax and numpy (``import vcmamba_jax`` itself is lazy), so a serving
process needs neither Flax nor this library's models.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

FORMAT = 'vcmamba_jax jax.export v1'
METADATA_FILE = 'export.json'
PROGRAM_FILE = 'forward.jax_export'
WEIGHTS_FILE = 'weights.npz'
_REEXPORT = 're-create the directory with `python scripts/export.py --weights ... --output {dir}`'


class ExportError(ValueError):
  """An export directory that cannot be used here (damaged, or for another platform)."""


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def current_platform() -> str:
  """The platform name jax.export uses for the default device: 'cpu', 'cuda', 'rocm' or 'tpu'."""
  device = jax.devices()[0]
  if device.platform == 'gpu':
    version = str(getattr(device.client, 'platform_version', '')).lower()
    return 'rocm' if 'rocm' in version else 'cuda'
  return device.platform


class ExportedModel:
  """A loaded export: ``model(images) -> logits``, jitted once per batch size.

  Attributes:
    metadata: the parsed export.json.
    exported: the ``jax.export.Exported``.
    image_size: S of the uint8 [batch, S, S, 3] input.
    num_classes: width of the logits.
  """

  def __init__(self, directory: str, metadata: dict[str, Any], exported: Any, weights: list):
    self.directory = directory
    self.metadata = metadata
    self.exported = exported
    self.image_size = int(metadata['input']['shape'][1])
    self.num_classes = int(metadata['output']['shape'][1])
    self._weights = [jax.device_put(w) for w in weights]
    self._call = jax.jit(exported.call)

  @property
  def platforms(self) -> tuple[str, ...]:
    return tuple(self.exported.platforms)

  def __call__(self, images: Any) -> np.ndarray:
    """uint8 [B, S, S, 3] preprocessed crops (see metadata['input']['preprocessing']) ->
    float32 logits [B, num_classes] (the mean of the two heads)."""
    images = np.asarray(images)
    size = self.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or images.dtype != np.uint8:
      raise ValueError(
        f'expected uint8 images [batch, {size}, {size}, 3] (preprocessed crops), got '
        f'{images.dtype} {list(images.shape)}'
      )
    return np.asarray(self._call(self._weights, images))

  def predict(self, images: Any, topk: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [B, k], class indices [B, k]), best first."""
    logits = self(images)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, axis=-1, kind='stable')[:, :topk]
    return np.take_along_axis(probs, order, -1), order


def _damaged(directory: str, filename: str, why: str) -> ExportError:
  return ExportError(
    f'{os.path.join(directory, filename)} {why}: the export directory is damaged or incomplete; '
    + _REEXPORT.format(dir=directory)
  )


def read_metadata(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, METADATA_FILE)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no export directory at {directory}')
  if not os.path.isfile(path):
    raise _damaged(directory, METADATA_FILE, 'is missing')
  try:
    with open(path) as f:
      metadata = json.load(f)
  except (OSError, ValueError) as e:
    raise _damaged(directory, METADATA_FILE, f'is not valid JSON ({e})') from e
  if not isinstance(metadata, dict) or metadata.get('format') != FORMAT:
    raise _damaged(directory, METADATA_FILE, f'does not describe a {FORMAT!r} export')
  return metadata


def _check_files(directory: str, metadata: dict[str, Any], verify: bool) -> None:
  for filename in (PROGRAM_FILE, WEIGHTS_FILE):
    path = os.path.join(directory, filename)
    expected = metadata.get('files', {}).get(filename, {})
    if not os.path.isfile(path):
      raise _damaged(directory, filename, 'is missing')
    if os.path.getsize(path) != expected.get('bytes'):
      raise _damaged(
        directory,
        filename,
        f'has {os.path.getsize(path)} bytes, {expected.get("bytes")} were written (truncated?)',
      )
    if verify and sha256_of(path) != expected.get('sha256'):
      raise _damaged(directory, filename, 'does not match the sha256 recorded in export.json')


def load_exported(
  directory: str | os.PathLike, *, verify: bool = True, platform: str | None = None
) -> ExportedModel:
  """Loads an export directory written by ``scripts/export.py``.

  Args:
    directory: the export directory.
    verify: check every file against the sha256 recorded at export time (about a second per
      500 MB); sizes are always checked.
    platform: the platform to run on (default: that of ``jax.devices()[0]``).

  Raises:
    ExportError: a missing, truncated or altered file (named), or an export that does not
      include this platform.
  """
  directory = os.path.abspath(os.fspath(directory))
  metadata = read_metadata(directory)
  _check_files(directory, metadata, verify)
  with open(os.path.join(directory, PROGRAM_FILE), 'rb') as f:
    program = f.read()
  try:
    exported = jax.export.deserialize(bytearray(program))
  except Exception as e:  # flatbuffer/MLIR parse errors of several types
    raise _damaged(
      directory, PROGRAM_FILE, f'cannot be deserialised ({type(e).__name__}: {e})'
    ) from e
  platform = platform or current_platform()
  if platform not in exported.platforms:
    raise ExportError(
      f'{directory} was exported for {list(exported.platforms)}, but this process runs on '
      f'{platform!r}. Export it again including this platform: `python scripts/export.py '
      f'--weights ... --output DIR --platforms {",".join([*exported.platforms, platform])}`.'
    )
  try:
    with np.load(os.path.join(directory, WEIGHTS_FILE), allow_pickle=False) as data:
      weights = [data[name] for name in sorted(data.files)]
  except (OSError, ValueError, EOFError) as e:
    raise _damaged(directory, WEIGHTS_FILE, f'cannot be read ({e})') from e
  expected = [tuple(a.shape) for a in exported.in_avals[: len(weights)]]
  if len(weights) + 1 != len(exported.in_avals) or [w.shape for w in weights] != expected:
    raise _damaged(directory, WEIGHTS_FILE, 'does not hold the arrays the program expects')
  return ExportedModel(directory, metadata, exported, weights)


def platforms_list(value: str | Sequence[str]) -> tuple[str, ...]:
  """'cpu,cuda,tpu' -> ('cpu', 'cuda', 'tpu'), checked."""
  names = tuple(p.strip() for p in (value.split(',') if isinstance(value, str) else value))
  unknown = [p for p in names if p not in ('cpu', 'cuda', 'rocm', 'tpu')]
  if not names or unknown:
    raise ValueError(f'unknown platforms {unknown or names}: choose from cpu, cuda, rocm, tpu')
  return names
