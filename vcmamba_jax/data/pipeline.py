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
- step k covers the global positions [k*B, (k+1)*B) and process p reads the contiguous block
  [k*B + p*b, k*B + (p+1)*b) of it (b = B/P). `jax.make_array_from_process_local_data` puts
  process p's rows at exactly that block of the global batch, so the global batch array (its
  content AND its row order, which mixup partners and per-row random draws depend on) is the same
  for any number of processes: a run gives the same numbers on 1 host or on a pod slice;
- the augmentation of position g uses `np.random.default_rng((seed, 1, g))`: each of the R repeats
  of an image gets its own crop/flip/RandAugment draw.

Every local batch is therefore a pure function of (seed, step): batches are identical for any
`num_workers`/`num_threads` (whole batches are built in the workers, worker w building batches
w, w + W, ..., and grain interleaves them back in order), and the global stream does not depend on
the number of processes P either.

Undecodable records never stop training: such a record is skipped, logged (record index, stream
position, error) and counted in its row's `num_skipped`, and the row is filled with a substitute
record drawn uniformly from the dataset with `default_rng((seed, 2, g))` (augmented with
`default_rng((seed, 1, g, attempt))`). Drawing the substitute, rather than shifting the rest of
the stream up by one, is what keeps batch k independent of the batches before it, so that
workers can build batches in parallel and only finished batches cross process boundaries.

Each batch is a dict of numpy arrays:
  image        uint8 [local_batch, H, W, 3]
  label        int32 [local_batch]
  index        int32 [local_batch]  record index in the source (bookkeeping)
  num_skipped  int32 [local_batch]  undecodable records skipped (and replaced) for this row
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
from collections.abc import Callable, Sequence
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
_SUBSTITUTE_STREAM = 2
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
      'use a smaller batch or a larger split'
    )
  return steps


def eval_num_batches(num_records: int, global_batch_size: int, process_count: int = 1) -> int:
  """Batches every process yields for a full pass: ceil(ceil(N / P) / (global_batch / P))."""
  local_batch = _local_batch_size(global_batch_size, process_count)
  return max(1, _ceil_div(_ceil_div(num_records, process_count), local_batch))


def _ceil_div(numerator: int, denominator: int) -> int:
  return -(numerator // -denominator)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f'global_batch_size={global_batch_size} must be a positive multiple of the number of '
      f'processes ({process_count}); every process loads global_batch_size / process_count'
    )
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
  # A worker builds one batch at a time (its main thread ships the previous one meanwhile, and
  # ArrayRecord reads a batch's records in parallel itself). In-process, a few threads overlap
  # the parts of decoding that release the GIL; more do not help.
  return 1 if num_workers > 0 else min(4, os.cpu_count() or 1)


def _ensure_absl_flags_parsed() -> None:
  # grain's worker processes read absl flags; outside `absl.app.run` (Colab, pytest) they are
  # unparsed and grain raises UnparsedFlagAccessError. Defaults are what we want there.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


# ------------------------------------------------------------------------------------------------
# Training stream.
# ------------------------------------------------------------------------------------------------


class RepeatedAugPositions:
  """Local batch k of process p -> its global stream positions and the records they read.

  Row j of local batch k is global position g = k * B + p * b + j (B the global batch, b = B / P
  the local one): process p reads a contiguous block of every global batch. Returns
  {'positions': int64 [b], 'records': int64 [b]}.
  """

  def __init__(
    self,
    *,
    num_records: int,
    seed: int,
    repeated_aug: int,
    positions_per_epoch: int,
    local_batch: int,
    process_index: int,
    process_count: int,
  ):
    self._num_records = num_records
    self._seed = seed
    self._repeated_aug = repeated_aug
    self._positions_per_epoch = positions_per_epoch
    self._local_batch = local_batch
    self._process_index = process_index
    self._process_count = process_count
    self._permutations: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = self.__dict__.copy()  # the lock and the cache are per process
    state['_lock'] = None
    state['_permutations'] = collections.OrderedDict()
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __str__(self) -> str:
    return (
      f'RepeatedAugPositions(seed={self._seed}, repeats={self._repeated_aug}, '
      f'positions_per_epoch={self._positions_per_epoch}, '
      f'process={self._process_index}/{self._process_count})'
    )

  def permutation(self, epoch: int) -> np.ndarray:
    """The record order of `epoch` (int64 [N]); cached for the two most recent epochs."""
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        rng = np.random.default_rng((self._seed, _PERMUTATION_STREAM, epoch))
        perm = rng.permutation(self._num_records)
        self._permutations[epoch] = perm
        while len(self._permutations) > 2:
          self._permutations.popitem(last=False)
      return perm

  def __call__(self, index: int) -> dict[str, np.ndarray]:
    global_batch = self._local_batch * self._process_count
    positions = (
      index * global_batch
      + self._process_index * self._local_batch
      + np.arange(self._local_batch, dtype=np.int64)
    )
    epochs, offsets = np.divmod(positions, self._positions_per_epoch)
    records = np.empty_like(positions)
    for epoch in np.unique(epochs):  # a batch spans at most two epochs
      rows = epochs == epoch
      records[rows] = self.permutation(int(epoch))[offsets[rows] // self._repeated_aug]
    return {'positions': positions, 'records': records}


def repeated_aug_sampler(
  *,
  num_records: int,
  seed: int,
  repeated_aug: int,
  positions_per_epoch: int,
  local_batch: int,
  process_index: int,
  process_count: int,
) -> grain.MapDataset:
  """The (endless) sampler of the training stream: element k is `RepeatedAugPositions(...)(k)`,
  the positions and records of this process's share of global batch k."""
  positions = RepeatedAugPositions(
    num_records=num_records,
    seed=seed,
    repeated_aug=repeated_aug,
    positions_per_epoch=positions_per_epoch,
    local_batch=local_batch,
    process_index=process_index,
    process_count=process_count,
  )
  return grain.MapDataset.range(_INFINITE // local_batch).map(positions)


def _read(source: Sequence[dict[str, Any]], indices: Sequence[int]) -> list[dict[str, Any]]:
  # ArrayRecord sources read a list of records in one call (and in parallel).
  getitems = getattr(source, '__getitems__', None)
  return list(getitems(list(indices))) if getitems else [source[i] for i in indices]


class TrainBatchBuilder:
  """Sampler element -> a full training batch, built in one go (in a grain worker if any).

  Row j decodes and augments record `records[j]` with `np.random.default_rng((seed, 1, g))`,
  g = positions[j]. An undecodable record is skipped: logged (index, position, error), counted in
  that row's `num_skipped`, and replaced by a record drawn uniformly from the dataset with
  `default_rng((seed, 2, g))` (augmented with `default_rng((seed, 1, g, attempt))`), so that every
  batch stays full and remains a pure function of (seed, step). Picklable.
  """

  def __init__(
    self,
    source: Sequence[dict[str, Any]],
    transform: TrainTransform,
    seed: int,
    max_substitutes: int = 16,
  ):
    self.source = source
    self.transform = transform
    self.seed = seed
    self.max_substitutes = max_substitutes

  def _example(
    self, position: int, record_index: int, record: dict[str, Any]
  ) -> tuple[np.ndarray, int, int, int]:
    """(image, label, record index used, records skipped) for one stream position."""
    substitutes = None
    for attempt in range(self.max_substitutes + 1):
      key = (self.seed, _AUGMENTATION_STREAM, position) + ((attempt,) if attempt else ())
      try:
        image = self.transform(record['image'], np.random.default_rng(key))
        return image, int(record['label']), record_index, attempt
      except ImageDecodeError as e:
        logging.warning(
          'Skipping undecodable record %d (stream position %d): %s', record_index, position, e
        )
      if substitutes is None:
        substitutes = np.random.default_rng((self.seed, _SUBSTITUTE_STREAM, position))
      record_index = int(substitutes.integers(len(self.source)))
      record = self.source[record_index]
    raise RuntimeError(
      f'{self.max_substitutes + 1} records in a row failed to decode at stream position '
      f'{position}; the dataset looks broadly corrupt. Rebuild it (scripts/prepare_imagenet.py) '
      'or check the storage it is read from.'
    )

  def __call__(self, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    positions, records = element['positions'], element['records']
    size = len(positions)
    side = self.transform.image_size
    batch = {
      'image': np.empty((size, side, side, 3), np.uint8),
      'label': np.empty((size,), np.int32),
      'index': np.empty((size,), np.int32),
      'num_skipped': np.empty((size,), np.int32),
    }
    for row, record in enumerate(_read(self.source, records.tolist())):
      image, label, index, skipped = self._example(int(positions[row]), int(records[row]), record)
      batch['image'][row] = image
      batch['label'][row], batch['index'][row], batch['num_skipped'][row] = label, index, skipped
    return batch


def close_at_exit(iterator: grain.DatasetIterator) -> grain.DatasetIterator:
  """`iterator`, closed at interpreter exit unless closed before."""
  # Stops prefetch threads and worker processes before interpreter teardown; otherwise their
  # finalizers run after module globals are gone and print spurious tracebacks.
  ref = weakref.ref(iterator)

  def close() -> None:
    if (alive := ref()) is not None:
      alive.close()

  atexit.register(close)
  return iterator


def exit_with_parent(worker_index: int = 0, worker_count: int = 1) -> None:
  """grain `worker_init_fn`: the worker exits within a second of its parent's death, however
  the parent died (kill -9, OOM), instead of living on as an orphan using CPU and memory.

  A watcher thread, not prctl(PR_SET_PDEATHSIG): grain starts workers from short-lived threads,
  and the kernel sends that signal when the creating *thread* exits.
  """
  del worker_index, worker_count
  parent = os.getppid()

  def watch() -> None:
    while os.getppid() == parent:  # an orphan is re-parented (to init or a subreaper)
      time.sleep(0.5)
    os._exit(1)

  threading.Thread(target=watch, name='vcmamba-exit-with-parent', daemon=True).start()


def _maybe_mp_prefetch(
  ds: grain.IterDataset, num_workers: int, worker_buffer_size: int
) -> grain.IterDataset:
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    ds = ds.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=worker_buffer_size
      ),
      worker_init_fn=exit_with_parent,
    )
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
  if transform is None:
    transform = TrainTransform(image_size, randaugment=randaugment)
  return batched_train_stream(
    len(source),
    TrainBatchBuilder(source, transform, seed),
    global_batch_size=global_batch_size,
    seed=seed,
    repeated_aug=repeated_aug,
    num_workers=num_workers,
    num_threads=num_threads,
    process_index=process_index,
    process_count=process_count,
    prefetch_batches=prefetch_batches,
  )


def batched_train_stream(
  num_records: int,
  builder: Callable[[np.ndarray], dict[str, np.ndarray]],
  *,
  global_batch_size: int,
  seed: int,
  repeated_aug: int,
  num_workers: int,
  num_threads: int | None,
  process_index: int | None,
  process_count: int | None,
  prefetch_batches: int,
) -> grain.IterDataset:
  """The infinite training stream of this process: ``builder`` (a grain map from one local batch
  of sampler positions/records to a batch of arrays, e.g. ``TrainBatchBuilder``) over the
  repeated-augmentation sampler, in threads, then in worker processes when ``num_workers``."""
  process_index, process_count = _process_layout(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  steps = train_steps_per_epoch(num_records, global_batch_size, repeated_aug)
  if num_threads is None:
    num_threads = _default_num_threads(num_workers)
  # Whole batches are built where the work happens (worker processes, or threads in-process):
  # batch k is a pure function of (seed, k), so the output does not depend on num_workers
  # (worker w builds batches w, w + W, ... and grain interleaves them back in order), and only
  # one ready batch per step crosses the process boundary (through shared memory).
  ds = repeated_aug_sampler(
    num_records=num_records,
    seed=seed,
    repeated_aug=repeated_aug,
    positions_per_epoch=steps * global_batch_size,
    local_batch=local_batch,
    process_index=process_index,
    process_count=process_count,
  )
  ds = ds.map(builder)
  ds = ds.to_iter_dataset(
    grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(prefetch_batches, num_threads)
    )
  )
  return _maybe_mp_prefetch(ds, num_workers, worker_buffer_size=max(1, prefetch_batches))


# ------------------------------------------------------------------------------------------------
# Evaluation.
# ------------------------------------------------------------------------------------------------


def eval_shard_bounds(num_records: int, process_index: int, process_count: int) -> tuple[int, int]:
  """[start, end) of the contiguous eval shard of a process (sizes differ by at most one)."""
  return (
    process_index * num_records // process_count,
    (process_index + 1) * num_records // process_count,
  )


class _ShardRecord:
  """Shard position i -> {'record_index', 'record'} of the contiguous shard [start, end) of
  `source`; past the shard (padding) record_index -1 and record None."""

  def __init__(self, source: Sequence[Any], start: int, end: int):
    self._source, self._start, self._end = source, start, end

  def __str__(self) -> str:
    return f'ShardRecord([{self._start}, {self._end}))'

  def __call__(self, index: int) -> dict[str, Any]:
    record_index = self._start + index
    if record_index >= self._end:
      return {'record_index': -1, 'record': None}
    return {'record_index': record_index, 'record': self._source[record_index]}


def eval_shard(source: Sequence[Any], start: int, end: int, padded_length: int) -> grain.MapDataset:
  """Records [start, end) of `source`, padded to `padded_length` elements (see `_ShardRecord`)."""
  return grain.MapDataset.range(padded_length).map(_ShardRecord(source, start, end))


class EvalExampleTransform:
  """Shard element -> {'image', 'label', 'mask', 'index', 'num_skipped'}; padding is masked."""

  def __init__(self, transform: EvalTransform):
    self.transform = transform

  def __call__(self, element: dict[str, Any]) -> dict[str, Any]:
    size = self.transform.image_size
    record, record_index = element['record'], element['record_index']
    masked = {
      'image': np.zeros((size, size, 3), np.uint8),
      'label': np.int32(0),
      'mask': np.bool_(False),
      'index': np.int32(record_index),
      'num_skipped': np.int32(0),
    }
    if record is None:
      return masked
    try:
      image = self.transform(record['image'])
    except ImageDecodeError as e:
      logging.warning('Masking undecodable eval record %d: %s', record_index, e)
      masked['num_skipped'] = np.int32(1)
      return masked
    return {
      'image': image,
      'label': np.int32(record['label']),
      'mask': np.bool_(True),
      'index': np.int32(record_index),
      'num_skipped': np.int32(0),
    }


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
  ds = eval_shard(source, start, end, num_batches * local_batch)
  ds = ds.map(EvalExampleTransform(EvalTransform(image_size, crop_pct)))
  # Batching before the workers is order-safe here: a worker's slice is whole batches and grain
  # interleaves them back in order.
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(2, num_threads))
  )
  return _maybe_mp_prefetch(ds, num_workers, worker_buffer_size=2)


def measure_throughput(
  iterator: Any, num_batches: int, warmup_batches: int = 2
) -> dict[str, float]:
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
  return {
    'images_per_sec': images / seconds,
    'batches_per_sec': num_batches / seconds,
    'seconds': seconds,
    'batch_size': images / max(1, num_batches),
  }
