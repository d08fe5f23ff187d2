"""grain input pipelines: infinite training stream with repeated augmentation, sharded eval.

Training (`create_train_iterator`)
----------------------------------
The GLOBAL sample stream is a pure function of (seed, dataset size, global batch size):

- epoch e is a permutation `perm_e` of the N records, drawn from `np.random.default_rng((seed, 0,
  e))`; with repeated augmentation R (DeiT's RASampler, R=3) every index is repeated R times in a
  row: stream position j of the epoch reads record `perm_e[j // R]`;
- an epoch holds `steps_per_epoch * global_batch_size` positions with
  `steps_per_epoch = samples_per_epoch // global_batch_size` and `samples_per_epoch =
  N // 256 * 256` when R > 1 (RASampler's rule: an epoch covers about N/R distinct images, each R
  times) or N when R == 1 (or when N < 256); the last partial batch of an epoch is dropped and the
  next epoch starts with a fresh permutation, so epochs and optimizer steps line up exactly;
- global position g goes to process g % P (the stream is interleaved across processes, as in
  RASampler), so with the global batch size divisible by P, the P local batches of a step
  together hold the global positions [k*B, (k+1)*B);
- the augmentation of position g uses `np.random.default_rng((seed, 1, g))`: each of the R repeats
  of an image gets its own crop/flip/RandAugment draw.

Batches are therefore identical for any `num_workers`/`num_threads` (workers decode disjoint
strided slices of the element stream and grain interleaves them back in order; skipping and
batching happen after that, in the main process), and the global stream does not depend on the
number of processes P either. Records whose image cannot be decoded are skipped (the batch is
filled with the next records of the process's stream), logged with their index and error, and
counted in the per-row `num_skipped` field.

Each batch is a dict of numpy arrays:
  image        uint8 [local_batch, H, W, 3]
  label        int32 [local_batch]
  index        int32 [local_batch]  record index in the source (bookkeeping)
  num_skipped  int32 [local_batch]  undecodable records skipped just before this row
                                    (bookkeeping: `batch['num_skipped'].sum()` per step; it is
                                    batch-sharded like the images, so a sum inside the jitted step
                                    gives the global count across processes)

Evaluation (`create_eval_iterator`)
-----------------------------------
Process p reads the contiguous shard [p*N//P, (p+1)*N//P) of the split, exactly once, in fixed
`global_batch_size // P` batches; rows past the end of the shard are padding with mask=False, and
every process yields `eval_num_batches(...)` batches (fully padded ones where its shard is shorter)
so that multi-host jitted eval steps never wait on a missing batch. Batches add
`mask` bool [local_batch]; an undecodable eval record is logged and masked out (`num_skipped` 1).

Resuming: the iterators are grain `DatasetIterator`s; save/restore their state with
`grain.checkpoint.CheckpointSave/CheckpointRestore` (orbax) next to the model. A state restores
into an iterator created with the same arguments (same process_count, num_workers and batch size).
"""

from __future__ import annotations

import atexit
import collections
import os
import sys
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from vcmamba_jax.data.transforms import (
    DEFAULT_CROP_PCT,
    DEFAULT_RANDAUGMENT,
    EvalTransform,
    ImageDecodeError,
    TrainTransform,
)

# Fields of a batch that are not model inputs.
BOOKKEEPING_KEYS: tuple[str, ...] = ('index', 'num_skipped')
# RASampler rounds the samples of an epoch down to a multiple of this.
_EPOCH_ROUNDING = 256
# Stream ids for `np.random.default_rng((seed, stream, ...))`.
_PERMUTATION_STREAM = 0
_AUGMENTATION_STREAM = 1
# Length of the "infinite" training MapDataset (grain needs a finite length).
_INFINITE = sys.maxsize


# ------------------------------------------------------------------------------------------------
# Epoch arithmetic.
# ------------------------------------------------------------------------------------------------


def samples_per_epoch(num_records: int, repeated_aug: int = 3) -> int:
  """Global samples in one epoch before batching: N // 256 * 256 if repeated_aug > 1, else N.

  (RASampler's rule; datasets smaller than 256 records use N.)
  """
  if repeated_aug > 1 and num_records >= _EPOCH_ROUNDING:
    return num_records // _EPOCH_ROUNDING * _EPOCH_ROUNDING
  return num_records


def train_steps_per_epoch(num_records: int, global_batch_size: int, repeated_aug: int = 3) -> int:
  """Optimizer steps per epoch: samples_per_epoch(N, repeated_aug) // global_batch_size."""
  steps = samples_per_epoch(num_records, repeated_aug) // global_batch_size
  if steps < 1:
    raise ValueError(
        f'global_batch_size={global_batch_size} is larger than one epoch '
        f'({samples_per_epoch(num_records, repeated_aug)} samples of {num_records} records); '
        'use a smaller batch or a larger split')
  return steps


def eval_num_batches(num_records: int, global_batch_size: int, process_count: int = 1) -> int:
  """Batches every process yields for a full pass: ceil(ceil(N / P) / (global_batch / P))."""
  local_batch = _local_batch_size(global_batch_size, process_count)
  return max(1, -(-(-(-num_records // process_count)) // local_batch))


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
        f'global_batch_size={global_batch_size} must be a positive multiple of the number of '
        f'processes ({process_count}); every process loads global_batch_size / process_count')
  return global_batch_size // process_count


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # lazy: worker processes never need it

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, {process_count})')
  return process_index, process_count


def _default_num_threads(num_workers: int) -> int:
  # Workers: 2 threads keep a worker's core busy while its main thread ships elements out.
  # In-process: PIL holds the GIL for much of the work, so more than a few threads do not help.
  return 2 if num_workers > 0 else min(4, os.cpu_count() or 1)


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside `absl.app.run` (Colab, pytest) they are
  # unparsed and grain raises UnparsedFlagAccessError. Defaults are what we want there.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------------------------------------
# Training stream.
# ------------------------------------------------------------------------------------------------


class _RepeatedAugStream(grain.MapDataset):
  """Local position i of process p -> the record at global position g = i * P + p.

  Elements: {'position': g, 'record_index': r, 'record': source[r]}.
  """

  _MUTATES_ELEMENT_SPEC = True

  def __init__(self, source: grain.MapDataset, *, seed: int, repeated_aug: int,
               positions_per_epoch: int, process_index: int, process_count: int):
    super().__init__(source)
    self._num_records = len(source)
    self._seed = seed
    self._repeated_aug = repeated_aug
    self._positions_per_epoch = positions_per_epoch
    self._process_index = process_index
    self._process_count = process_count
    self._permutations: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()  # locks and caches are per process
    state['_lock'] = None
    state['_permutations'] = collections.OrderedDict()
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return _INFINITE

  def __str__(self) -> str:
    return (f'RepeatedAugStream(seed={self._seed}, repeats={self._repeated_aug}, '
            f'positions_per_epoch={self._positions_per_epoch}, '
            f'process={self._process_index}/{self._process_count})')

  def permutation(self, epoch: int) -> np.ndarray:
    """The record order of `epoch` (int32 [N]); cached for the two most recent epochs."""
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        rng = np.random.default_rng((self._seed, _PERMUTATION_STREAM, epoch))
        perm = rng.permutation(self._num_records).astype(np.int32)
        self._permutations[epoch] = perm
        while len(self._permutations) > 2:
          self._permutations.popitem(last=False)
      return perm

  def global_position(self, index: int) -> int:
    return index * self._process_count + self._process_index

  def record_index(self, position: int) -> int:
    """Record read at global stream position `position`."""
    epoch, offset = divmod(position, self._positions_per_epoch)
    return int(self.permutation(epoch)[offset // self._repeated_aug])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    with self._stats.record_self_time():
      position = self.global_position(index)
      record_index = self.record_index(position)
    return {'position': position, 'record_index': record_index,
            'record': self._parent[record_index]}


class TrainExampleTransform:
  """Stream element -> {'image', 'label', 'index'}, or an error marker if the image is corrupt.

  Picklable (runs in grain worker processes). Randomness: `default_rng((seed, 1, position))`.
  """

  def __init__(self, transform: TrainTransform, seed: int):
    self.transform = transform
    self.seed = seed

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    position, record = element['position'], element['record']
    rng = np.random.default_rng((self.seed, _AUGMENTATION_STREAM, position))
    try:
      image = self.transform(record['image'], rng)
    except ImageDecodeError as e:
      return {'error': str(e), 'index': element['record_index'], 'position': position}
    return {'image': image, 'label': np.int32(record['label']),
            'index': np.int32(element['record_index'])}


class _SkipUndecodable(grain.IterDataset):
  """Drops error markers, logging them; counts them in the next kept element's 'num_skipped'."""

  def __iter__(self) -> grain.DatasetIterator:
    return _SkipUndecodableIterator(self._parent.__iter__())

  def __str__(self) -> str:
    return 'SkipUndecodable'


class _SkipUndecodableIterator(grain.DatasetIterator):

  def __next__(self) -> dict[str, Any]:
    skipped = 0
    while True:
      element = next(self._parent)
      if 'error' not in element:
        element['num_skipped'] = np.int32(skipped)
        return element
      skipped += 1
      logging.warning('Skipping undecodable record %d (stream position %d): %s',
                      element['index'], element['position'], element['error'])

  # Between two `next` calls nothing is pending, so the state is the parent's.
  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)

  def __str__(self) -> str:
    return 'SkipUndecodableIterator'


def _close_at_exit(iterator: grain.DatasetIterator) -> grain.DatasetIterator:
  # Stops prefetch threads and worker processes before interpreter teardown; otherwise their
  # finalizers run after module globals are gone and print spurious tracebacks.
  ref = weakref.ref(iterator)

  def close() -> None:
    if (alive := ref()) is not None:
      alive.close()

  atexit.register(close)
  return iterator


def _maybe_mp_prefetch(ds: grain.IterDataset, num_workers: int,
                       worker_buffer_size: int) -> grain.IterDataset:
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=worker_buffer_size))
  return ds


def create_train_dataset(
    *,
    source: Sequence[dict[str, Any]],
    global_batch_size: int,
    image_size: int = 224,
    seed: int = 0,
    repeated_aug: int = 3,
    randaugment: str | None = DEFAULT_RANDAUGMENT,
    num_workers: int = 0,
    num_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch_batches: int = 2,
    transform: TrainTransform | None = None,
) -> grain.IterDataset:
  """The training pipeline as a grain `IterDataset` over an already opened `source`.

  See `create_train_iterator` for the arguments; `transform` overrides the default
  `TrainTransform(image_size, randaugment=randaugment)`.
  """
  if repeated_aug < 1:
    raise ValueError(f'repeated_aug must be >= 1, got {repeated_aug}')
  process_index, process_count = _process_layout(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  num_records = len(source)
  steps = train_steps_per_epoch(num_records, global_batch_size, repeated_aug)
  if transform is None:
    transform = TrainTransform(image_size, randaugment=randaugment)
  if num_threads is None:
    num_threads = _default_num_threads(num_workers)

  ds = _RepeatedAugStream(
      grain.MapDataset.source(source), seed=seed, repeated_aug=repeated_aug,
      positions_per_epoch=steps * global_batch_size, process_index=process_index,
      process_count=process_count)
  ds = ds.map(TrainExampleTransform(transform, seed))
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(2 * local_batch, 4 * num_threads)))
  # Workers see the element stream only: skipping and batching stay in this process, which keeps
  # batches independent of num_workers (grain interleaves worker outputs in stream order).
  ds = _maybe_mp_prefetch(ds, num_workers,
                          worker_buffer_size=max(8, local_batch // max(1, num_workers)))
  ds = _SkipUndecodable(ds)
  ds = ds.batch(local_batch, drop_remainder=True)
  if prefetch_batches > 0:
    ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
  return ds


def create_train_iterator(
    *,
    dataset: str,
    split: str = 'train',
    data_dir: str | os.PathLike | None = None,
    global_batch_size: int,
    image_size: int = 224,
    seed: int = 0,
    repeated_aug: int = 3,
    randaugment: str | None = DEFAULT_RANDAUGMENT,
    num_workers: int = 0,
    num_threads: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    prefetch_batches: int = 2,
) -> grain.DatasetIterator:
  """Infinite, deterministic, resumable training iterator (see the module docstring).

  Args:
    dataset: TFDS name ('imagenet2012', 'vcmamba_digits', ...), ArrayRecord format.
    split: TFDS split.
    data_dir: TFDS data dir (None: TFDS default).
    global_batch_size: batch over all processes; must be divisible by process_count.
    image_size: output side of RandomResizedCrop.
    seed: determines the permutations and every augmentation draw.
    repeated_aug: R consecutive copies of each sampled index (3 = DeiT; 1 = off).
    randaugment: timm RandAugment config string, or None to disable.
    num_workers: grain worker processes (0: in-process threads; for CI, tests, notebooks).
      With workers, call this from code under `if __name__ == '__main__':` (grain spawns).
    num_threads: decode threads per worker (or in-process); default 2 with workers, else #CPUs.
    process_index, process_count: this host's index and the host count (default: jax's).
    prefetch_batches: batches assembled ahead in a background thread (0: none).

  Returns:
    A grain `DatasetIterator` yielding dicts image uint8 [local_batch, H, W, 3], label int32
    [local_batch], index int32 [local_batch], num_skipped int32 [local_batch]. Its state can be
    saved with `grain.checkpoint.CheckpointSave(iterator)`.
  """
  from vcmamba_jax.data.datasets import get_source

  source = get_source(dataset, split, data_dir)
  return _close_at_exit(iter(create_train_dataset(
      source=source, global_batch_size=global_batch_size, image_size=image_size, seed=seed,
      repeated_aug=repeated_aug, randaugment=randaugment, num_workers=num_workers,
      num_threads=num_threads, process_index=process_index, process_count=process_count,
      prefetch_batches=prefetch_batches)))


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def eval_shard_bounds(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of the contiguous eval shard of a process (sizes differ by at most one)."""
  return (process_index * num_records // process_count,
          (process_index + 1) * num_records // process_count)


class _EvalShard(grain.MapDataset):
  """Padded contiguous shard: i -> {'record_index', 'record'} (record None past the shard)."""

  _MUTATES_ELEMENT_SPEC = True

  def __init__(self, source: grain.MapDataset, start: int, end: int, padded_length: int):
    super().__init__(source)
    self._start, self._end, self._padded_length = start, end, padded_length

  def __len__(self) -> int:
    return self._padded_length

  def __str__(self) -> str:
    return f'EvalShard([{self._start}, {self._end}) padded to {self._padded_length})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    record_index = self._start + index
    if record_index >= self._end:
      return {'record_index': -1, 'record': None}
    return {'record_index': record_index, 'record': self._parent[record_index]}


class EvalExampleTransform:
  """Shard element -> {'image', 'label', 'mask', 'index', 'num_skipped'}; padding is masked."""

  def __init__(self, transform: EvalTransform):
    self.transform = transform

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    size = self.transform.image_size
    record, record_index = element['record'], element['record_index']
    masked = {'image': np.zeros((size, size, 3), np.uint8), 'label': np.int32(0),
              'mask': np.bool_(False), 'index': np.int32(record_index),
              'num_skipped': np.int32(0)}
    if record is None:
      return masked
    try:
      image = self.transform(record['image'])
    except ImageDecodeError as e:
      logging.warning('Masking undecodable eval record %d: %s', record_index, e)
      masked['num_skipped'] = np.int32(1)
      return masked
    return {'image': image, 'label': np.int32(record['label']), 'mask': np.bool_(True),
            'index': np.int32(record_index), 'num_skipped': np.int32(0)}


def create_eval_dataset(
    *,
    source: Sequence[dict[str, Any]],
    global_batch_size: int,
    image_size: int = 224,
    crop_pct: float = DEFAULT_CROP_PCT,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    num_threads: int | None = None,
) -> grain.IterDataset:
  """The eval pipeline as a grain `IterDataset` over an opened `source` (see
  `create_eval_iterator`)."""
  process_index, process_count = _process_layout(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  num_batches = eval_num_batches(len(source), global_batch_size, process_count)
  start, end = eval_shard_bounds(len(source), process_index, process_count)
  if num_threads is None:
    num_threads = _default_num_threads(num_workers)
  ds = _EvalShard(grain.MapDataset.source(source), start, end, num_batches * local_batch)
  ds = ds.map(EvalExampleTransform(EvalTransform(image_size, crop_pct)))
  # Batching before the workers is order-safe here: a worker's slice is whole batches and grain
  # interleaves them back in order.
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads,
                                            prefetch_buffer_size=max(2, num_threads)))
  return _maybe_mp_prefetch(ds, num_workers, worker_buffer_size=2)


def create_eval_iterator(
    *,
    dataset: str,
    split: str = 'validation',
    data_dir: str | os.PathLike | None = None,
    global_batch_size: int,
    image_size: int = 224,
    crop_pct: float = DEFAULT_CROP_PCT,
    process_index: int | None = None,
    process_count: int | None = None,
    num_workers: int = 0,
    num_threads: int | None = None,
) -> grain.DatasetIterator:
  """One pass over `split`: every record exactly once across processes, fixed batch shapes.

  Returns:
    A finite grain iterator of exactly `eval_num_batches(len(source), global_batch_size,
    process_count)` dicts: image uint8 [local_batch, image_size, image_size, 3], label int32,
    mask bool (False for padding), index int32 (-1 for padding), num_skipped int32 [local_batch].
  """
  from vcmamba_jax.data.datasets import get_source

  source = get_source(dataset, split, data_dir)
  return _close_at_exit(iter(create_eval_dataset(
      source=source, global_batch_size=global_batch_size, image_size=image_size,
      crop_pct=crop_pct, process_index=process_index, process_count=process_count,
      num_workers=num_workers, num_threads=num_threads)))


# ------------------------------------------------------------------------------------------------
# Measurement.
# ------------------------------------------------------------------------------------------------


def measure_throughput(iterator: Any, num_batches: int, warmup_batches: int = 2) -> dict[str, float]:
  """Host pipeline speed: pulls `warmup_batches` (not timed: worker start-up), then times
  `num_batches`.

  Returns:
    {'images_per_sec', 'batches_per_sec', 'seconds', 'batch_size'}.
  """
  for _ in range(warmup_batches):
    next(iterator)
  images = 0
  start = time.perf_counter()
  for _ in range(num_batches):
    images += len(next(iterator)['label'])
  seconds = time.perf_counter() - start
  return {'images_per_sec': images / seconds, 'batches_per_sec': num_batches / seconds,
          'seconds': seconds, 'batch_size': images / max(1, num_batches)}
