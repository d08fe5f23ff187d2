"""Training checkpoints (orbax + grain), preemption, and loading weights from checkpoints.

Layout of a training run's workdir:

    WORKDIR/checkpoints/<step>/state/       the TrainState (params, batch_stats, opt_state, ema,
                                            step, rng, skipped_updates), sharded, every process
                                            writes its shards
    WORKDIR/checkpoints/<step>/data_iter/   the grain iterator state of every process

Saves are asynchronous (training continues while the files are written) and atomic (orbax
writes to a temporary directory and renames it when complete), so an interrupted save never
replaces the previous good checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINTS_DIR = 'checkpoints'
STATE_ITEM = 'state'
DATA_ITER_ITEM = 'data_iter'


# ------------------------------------------------------------------------------------------------
# The run's checkpoint manager.
# ------------------------------------------------------------------------------------------------


def create_manager(
  workdir: str, *, max_to_keep: int, async_save: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
  """Orbax manager of `workdir/checkpoints` with the items 'state' and 'data_iter'.

  Steps are saved only when `save` is called (the training loop decides when); the newest
  `max_to_keep` are kept.
  """
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR),
    item_names=(STATE_ITEM, DATA_ITER_ITEM),
    options=options,
  )


def save(
  manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: grain.DatasetIterator | None
) -> None:
  """Starts an asynchronous save of `state` (+ the iterator position) as `step`.

  Returns once the device arrays have been copied; the files are written in the background
  (`manager.wait_until_finished()` waits for them). A step that already exists is left alone
  (e.g. the final step of a run resumed after it had finished).
  """
  if step in manager.all_steps():
    return
  items = {STATE_ITEM: ocp.args.StandardSave(state)}
  if data_iterator is not None:
    items[DATA_ITER_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.save(step, args=ocp.args.Composite(**items), force=True)


def restore(
  manager: ocp.CheckpointManager,
  step: int,
  abstract_state: Any,
  shardings: Any,
  data_iterator: grain.DatasetIterator | None,
) -> Any:
  """Restores the state of `step` directly into `shardings` (and the iterator, in place).

  Args:
    abstract_state: the state's structure with ShapeDtypeStruct (or array) leaves.
    shardings: matching tree of `NamedSharding`s.
    data_iterator: a freshly created iterator (same pipeline arguments) to move to the saved
      position, or None.
  """
  target = jax.tree.map(
    lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
    abstract_state,
    shardings,
  )
  items = {STATE_ITEM: ocp.args.StandardRestore(target)}
  if data_iterator is not None:
    items[DATA_ITER_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**items))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
      f'Cannot restore {manager.directory}/{step} into this run: {e}\nThe checkpoint was '
      'written by a different configuration (model, optimizer, EMA or input pipeline '
      'settings, or another number of processes). Use a fresh '
      '--workdir, or start from its weights with --config.init_from=<that workdir>.'
    ) from e
  return restored[STATE_ITEM]


# ------------------------------------------------------------------------------------------------
# Preemption.
# ------------------------------------------------------------------------------------------------


class PreemptionWatcher:
  """Tells the loop when to save and stop because the job is being preempted.

  Multi-process jobs: JAX's preemption service (started by `jax.distributed.initialize`) turns a
  SIGTERM on any host into one agreed step for all hosts; `reached(step)` asks it at every step
  (`ocp.multihost.reached_preemption`, i.e. `multihost_utils.reached_preemption_sync_point`).
  Single process: a SIGTERM handler sets a flag and the loop saves after the current step.
  Use as a context manager: the previous SIGTERM handler is restored on exit.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous_handler = None
    self._installed = False

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
      self._installed = True
    return self

  def __exit__(self, *exc_info) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous_handler or signal.SIG_DFL)
      self._installed = False

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint after the current step, then exiting.')
    self._signalled.set()

  def reached(self, step: int) -> bool:
    """Must be called at every step, by every process, from the same first step."""
    if jax.process_count() > 1:
      return ocp.multihost.reached_preemption(step)
    return self._signalled.is_set()


# ------------------------------------------------------------------------------------------------
# Weights from a checkpoint (init_from, eval).
# ------------------------------------------------------------------------------------------------


def find_training_checkpoint(path: str) -> str | None:
  """The `.../<step>/state` directory that `path` designates, or None if it is not one of ours.

  `path` may be a workdir, its `checkpoints` directory (latest step is used) or a step directory.
  """
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, STATE_ITEM)):
    return os.path.join(path, STATE_ITEM)
  if os.path.isdir(os.path.join(path, CHECKPOINTS_DIR)):
    path = os.path.join(path, CHECKPOINTS_DIR)
  if not os.path.isdir(path):
    return None
  steps = [
    int(name)
    for name in os.listdir(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, name, STATE_ITEM))
  ]
  return os.path.join(path, str(max(steps)), STATE_ITEM) if steps else None


def read_training_weights(state_dir: str) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} and, if present, 'ema' of a saved TrainState as numpy.

  Only these subtrees are read (no optimizer state), whatever mesh wrote them.
  """
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(state_dir).item_metadata.tree
  wanted = {k: tree[k] for k in ('params', 'batch_stats', 'ema') if tree.get(k)}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  return checkpointer.restore(
    state_dir,
    args=ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args, partial_restore=True),
  )
