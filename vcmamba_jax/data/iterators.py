"""Train and eval iterators by dataset name: open the prepared TFDS source, build the pipeline.

Conveniences for notebooks and tests; the trainer opens its sources itself (they may also be
image folders) and calls `pipeline.create_train_dataset` / `create_eval_dataset`.
"""

from __future__ import annotations

import os

import grain

from vcmamba_jax.data import pipeline
from vcmamba_jax.data.datasets import get_source
from vcmamba_jax.data.transforms import DEFAULT_CROP_PCT, DEFAULT_RANDAUGMENT


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
    num_threads: batches built concurrently per worker (or in-process, where they are threads
      sharing the GIL); default 1 with workers, else min(4, #CPUs).
    process_index, process_count: this host's index and the host count (default: jax's).
    prefetch_batches: finished batches buffered per worker (in-process: read-ahead batches).

  Returns:
    A grain `DatasetIterator` yielding dicts image uint8 [local_batch, H, W, 3], label int32
    [local_batch], index int32 [local_batch], num_skipped int32 [local_batch]. Its state can be
    saved with `grain.checkpoint.CheckpointSave(iterator)`. Steps per epoch:
    `train_steps_per_epoch(len(get_source(dataset, split, data_dir)), global_batch_size,
    repeated_aug)`. Call `iterator.close()` when done to stop worker processes early.
  """
  source = get_source(dataset, split, data_dir)
  return pipeline.close_at_exit(
    iter(
      pipeline.create_train_dataset(
        source=source,
        global_batch_size=global_batch_size,
        image_size=image_size,
        seed=seed,
        repeated_aug=repeated_aug,
        randaugment=randaugment,
        num_workers=num_workers,
        num_threads=num_threads,
        process_index=process_index,
        process_count=process_count,
        prefetch_batches=prefetch_batches,
      )
    )
  )


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

  Args:
    dataset, split, data_dir: the TFDS source (ArrayRecord).
    global_batch_size: batch over all processes; must be divisible by process_count.
    image_size, crop_pct: resize the shorter side to int(image_size / crop_pct) (bicubic), then
      centre-crop image_size.
    process_index, process_count: this host's index and the host count (default: jax's).
    num_workers: grain worker processes (0: in-process threads).
    num_threads: batches prepared concurrently per worker / in-process.

  Returns:
    A finite grain iterator of exactly `eval_num_batches(len(source), global_batch_size,
    process_count)` dicts: image uint8 [local_batch, image_size, image_size, 3], label int32,
    mask bool (False for padding), index int32 (-1 for padding), num_skipped int32 [local_batch].
  """
  source = get_source(dataset, split, data_dir)
  return pipeline.close_at_exit(
    iter(
      pipeline.create_eval_dataset(
        source=source,
        global_batch_size=global_batch_size,
        image_size=image_size,
        crop_pct=crop_pct,
        process_index=process_index,
        process_count=process_count,
        num_workers=num_workers,
        num_threads=num_threads,
      )
    )
  )
