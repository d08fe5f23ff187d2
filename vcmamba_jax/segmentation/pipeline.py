"""grain pipelines for segmentation, on the classification pipeline's machinery (same global
stream, per-position RNG, contiguous per-process blocks, resumable iterator state, padded exact
eval shards; see ``vcmamba_jax.data.pipeline``).

Train batches: image uint8 [b, crop, crop, 3], label uint8 [b, crop, crop] (0..149, 255 ignored:
reduce_zero_label and padding), size int32 [b, 2] (real crop size; the device zeroes the image
padding after normalisation), index int32 [b], num_skipped int32 [b].

Eval batches: image uint8 [b, *image_canvas, 3], label uint8 [b, *label_canvas] (RAW labels),
size int32 [b, 2] (resized image), orig_size int32 [b, 2], mask bool [b], index, num_skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import logging

from vcmamba_jax.data import pipeline as base
from vcmamba_jax.data.transforms import ImageDecodeError
from vcmamba_jax.segmentation.transforms import SegEvalTransform, SegTrainTransform, decode_pair


def _record_name(record: dict[str, Any], index: int) -> str:
  name = record.get('file_name', b'')
  name = name.decode() if isinstance(name, bytes) else str(name)
  return f'record {index}' + (f' ({name})' if name else '')


class SegTrainBatchBuilder:
  """Sampler element -> a training batch (undecodable images are replaced like in
  classification; a label that does not fit its image is an error naming the record)."""

  def __init__(self, source, transform: SegTrainTransform, seed: int, max_substitutes: int = 16):
    self.source, self.transform, self.seed = source, transform, seed
    self.max_substitutes = max_substitutes

  def _example(self, position: int, record_index: int, record: dict[str, Any]):
    substitutes = None
    for attempt in range(self.max_substitutes + 1):
      key = (self.seed, base._AUGMENTATION_STREAM, position) + ((attempt,) if attempt else ())
      try:
        image, label = decode_pair(
          record['image'], record['label'], _record_name(record, record_index)
        )
        return (*self.transform(image, label, np.random.default_rng(key)), record_index, attempt)
      except ImageDecodeError as e:
        logging.warning(
          'Skipping undecodable record %d (position %d): %s', record_index, position, e
        )
      if substitutes is None:
        substitutes = np.random.default_rng((self.seed, base._SUBSTITUTE_STREAM, position))
      record_index = int(substitutes.integers(len(self.source)))
      record = self.source[record_index]
    raise RuntimeError(f'{self.max_substitutes + 1} records in a row failed to decode')

  def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    positions, records = element['positions'], element['records']
    n, crop = len(positions), self.transform.crop_size
    batch = {
      'image': np.empty((n, crop, crop, 3), np.uint8),
      'label': np.empty((n, crop, crop), np.uint8),
      'size': np.empty((n, 2), np.int32),
      'index': np.empty((n,), np.int32),
      'num_skipped': np.empty((n,), np.int32),
    }
    for row, record in enumerate(base._read(self.source, records.tolist())):
      image, label, size, index, skipped = self._example(
        int(positions[row]), int(records[row]), record
      )
      batch['image'][row], batch['label'][row], batch['size'][row] = image, label, size
      batch['index'][row], batch['num_skipped'][row] = index, skipped
    return batch


def create_seg_train_dataset(
  *,
  source: Sequence[dict[str, Any]],
  global_batch_size: int,
  transform: SegTrainTransform,
  seed: int = 0,
  num_workers: int = 0,
  num_threads: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  prefetch_batches: int = 2,
) -> grain.IterDataset:
  """Infinite deterministic training stream (a pure function of seed and step)."""
  return base.batched_train_stream(
    len(source),
    SegTrainBatchBuilder(source, transform, seed),
    global_batch_size=global_batch_size,
    seed=seed,
    repeated_aug=1,
    num_workers=num_workers,
    num_threads=num_threads,
    process_index=process_index,
    process_count=process_count,
    prefetch_batches=prefetch_batches,
  )


class SegEvalExample:
  """Shard element -> one eval example on the canvases; padding rows are masked."""

  def __init__(self, transform: SegEvalTransform):
    self.transform = transform

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    t = self.transform
    record, record_index = element['record'], element['record_index']
    masked = {
      'image': np.zeros(t.image_canvas + (3,), np.uint8),
      'label': np.full(t.label_canvas, 255, np.uint8),
      'size': np.array(t.image_canvas, np.int32),
      'orig_size': np.array(t.label_canvas, np.int32),
      'mask': np.bool_(False),
      'index': np.int32(record_index),
      'num_skipped': np.int32(0),
    }
    if record is None:
      return masked
    try:
      image, label = decode_pair(
        record['image'], record['label'], _record_name(record, record_index)
      )
    except ImageDecodeError as e:
      logging.warning('Masking undecodable eval record %d: %s', record_index, e)
      return {**masked, 'num_skipped': np.int32(1)}
    image, label, size, orig = t(image, label)
    return {
      'image': image,
      'label': label,
      'size': size,
      'orig_size': orig,
      'mask': np.bool_(True),
      'index': np.int32(record_index),
      'num_skipped': np.int32(0),
    }


def create_seg_eval_dataset(
  *,
  source: Sequence[dict[str, Any]],
  global_batch_size: int,
  transform: SegEvalTransform,
  process_index: int | None = None,
  process_count: int | None = None,
  num_workers: int = 0,
  num_threads: int | None = None,
) -> grain.IterDataset:
  """One exact pass over the split (every record once across processes, padded batches)."""
  process_index, process_count = base._process_layout(process_index, process_count)
  local_batch = base._local_batch_size(global_batch_size, process_count)
  num_batches = base.eval_num_batches(len(source), global_batch_size, process_count)
  start, end = base.eval_shard_bounds(len(source), process_index, process_count)
  if num_threads is None:
    num_threads = base._default_num_threads(num_workers)
  ds = base.eval_shard(source, start, end, num_batches * local_batch)
  ds = ds.map(SegEvalExample(transform)).batch(local_batch, drop_remainder=True)
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
  )
  return base._maybe_mp_prefetch(ds, num_workers, worker_buffer_size=2)
