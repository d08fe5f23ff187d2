"""Training checkpoints (orbax + grain), preemption, and loading weights from checkpoints.

Layout of a training run's workdir:

    WORKDIR/checkpoints/<step>/state/       the TrainState (params, batch_stats, opt_state, ema,
                                            step, rng, skipped_updates), sharded, every process
                                            writes its shards
    WORKDIR/checkpoints/<step>/data_iter/   the grain iterator state of every process

    WORKDIR/checkpoints/<step>/vcmamba_checksums.json   size + sha256 of every file above

Saves are asynchronous (training continues while the files are written) and atomic (orbax
writes to a temporary directory and renames it when complete), so an interrupted save never
replaces the previous good checkpoint. The checksums are written into the temporary directory
after every file of the step is complete and before the rename, so a committed step always has
them; `RunCheckpoints.restore_latest` verifies them and falls back to the newest intact step
(moving damaged ones to WORKDIR/checkpoints.damaged/) instead of restoring corrupt bytes.
"""

from __future__ import annotations

import datetime
import os
import shutil
import signal
import threading
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vcmamba_jax.integrity import has_manifest, verify_step, write_manifest

CHECKPOINTS_DIR = 'checkpoints'
DAMAGED_DIR = 'checkpoints.damaged'
STATE_ITEM = 'state'
DATA_ITER_ITEM = 'data_iter'

# Exit codes of main.py (README "Exit codes"): a preempted run saved its state and can be
# requeued (EX_TEMPFAIL of sysexits.h); a second Ctrl-C stops at once without saving (128 + 2).
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130

# Orbax copies a replicated array to the host in slices, one per replica ("replica-parallel"),
# each slice a device computation of its own. For the many small arrays of a train state that
# costs more than it saves: vcmamba_nano's 781 arrays on 8 CPU devices took 11.9 s to start the
# first save (6,208 slice programs compiled) and 1.0-1.3 s later; whole arrays below this
# slice size: 0.5 s and 0.2-0.4 s. Large arrays of S/M/B are still split across replicas.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20


class CheckpointDamagedError(RuntimeError):
  """No intact checkpoint is left to resume from (every step failed verification)."""


class CheckpointSaveError(RuntimeError):
  """A background save failed (full disk, permissions, ...); the message is one line."""


# ------------------------------------------------------------------------------------------------
# The run's checkpoint manager.
# ------------------------------------------------------------------------------------------------


def create_manager(
  workdir: str,
  *,
  max_to_keep: int,
  async_save: bool = True,
  read_only: bool = False,
  post_finalization_callback: Callable[[], None] | None = None,
) -> ocp.CheckpointManager:
  """Orbax manager of `workdir/checkpoints` with the items 'state' and 'data_iter'.

  Steps are saved only when `save` is called (the training loop decides when); the newest
  `max_to_keep` are kept. `post_finalization_callback` runs in the background save thread once
  every file of a step is written, before the step is committed (see `RunCheckpoints`).
  """
  if max_to_keep < 1:
    raise ValueError(f'max_to_keep={max_to_keep} must be >= 1 (the final step is always kept)')
  _use_array_handler()
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    create=not read_only,
    read_only=read_only,
    enable_async_checkpointing=async_save,
    cleanup_tmp_directories=True,
    async_options=ocp.AsyncOptions(post_finalization_callback=post_finalization_callback)
    if post_finalization_callback is not None
    else None,
  )
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIR),
    item_names=(STATE_ITEM, DATA_ITER_ITEM),
    options=options,
  )


_ARRAY_HANDLER_REGISTERED = False


def _use_array_handler() -> None:
  """Registers (once per process, for every orbax user in it) orbax's jax.Array handler with
  replica-parallel saving only for slices of at least REPLICA_PARALLEL_MIN_SLICE_BYTES. Orbax's
  other defaults stay (on GPUs it does not split at all)."""
  global _ARRAY_HANDLER_REGISTERED
  if not _ARRAY_HANDLER_REGISTERED:
    handler = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    _ARRAY_HANDLER_REGISTERED = True


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
# Integrity: checksums written with each step, verified before a restore.
# ------------------------------------------------------------------------------------------------


SaveHook = Callable[[int, str], None]


class RunCheckpoints:
  """The checkpoints of one training run: verified saves, fall-back restores, save errors.

  Args:
    workdir: the run's directory (checkpoints go to `workdir/checkpoints`).
    keep: how many of the newest steps to keep (>= 1).
    storage_hook: `hook(step, step_dir)` called in the background save thread after the step's
      files are written and before they are committed. For tests (slow or failing storage);
      an exception fails the save like a failing disk would.
  """

  def __init__(self, workdir: str, *, keep: int, storage_hook: SaveHook | None = None):
    self.workdir = os.path.abspath(workdir)
    self._storage_hook = storage_hook
    self._saving_step: int | None = None
    self._error: CheckpointSaveError | None = None
    self.manager = create_manager(
      self.workdir, max_to_keep=keep, post_finalization_callback=self._on_files_written
    )

  @property
  def directory(self) -> str:
    return str(self.manager.directory)

  def _pending_dir(self, step: int) -> str:
    # Orbax writes into '<step>.orbax-checkpoint-tmp...' and renames it after this callback; on
    # object stores (no rename) it writes '<step>' directly and adds a commit marker.
    base = self.directory
    for name in sorted(os.listdir(base)):
      if name.startswith(f'{step}.orbax-checkpoint-tmp'):
        return os.path.join(base, name)
    if os.path.isdir(os.path.join(base, str(step))):
      return os.path.join(base, str(step))
    raise FileNotFoundError(f'the directory of step {step} being saved is not in {base}')

  def _on_files_written(self) -> None:
    step = self._saving_step
    path = os.path.join(self.directory, str(step))
    try:
      if self._storage_hook is None and jax.process_index() != 0:
        return  # process 0 writes the checksums of every process's files (shared storage)
      step_dir = self._pending_dir(step)
      if self._storage_hook is not None:
        self._storage_hook(step, step_dir)
      if jax.process_index() == 0:
        write_manifest(step_dir)
    except BaseException as e:
      self._error = CheckpointSaveError(
        f'saving checkpoint step {step} to {path} failed: {_one_line(e)}'
      )
      raise

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None) -> None:
    """Starts an asynchronous, verified save of `step` (see `save`); waits for the previous."""
    self.wait()
    self._saving_step = step
    save(self.manager, step, state, data_iterator)

  def _record(self, e: BaseException) -> None:
    if self._error is None:
      path = os.path.join(self.directory, str(self._saving_step))
      self._error = CheckpointSaveError(
        f'saving checkpoint step {self._saving_step} to {path} failed: {_one_line(e)}'
      )

  def check(self) -> None:
    """Raises CheckpointSaveError (one line) if a background save has failed."""
    if self._error is None:
      try:
        self.manager.check_for_errors()
      except Exception as e:  # orbax re-raises the background thread's exception
        self._record(e)
    if self._error is not None:
      good = [s for s in self.manager.all_steps() if s != self._saving_step]
      raise CheckpointSaveError(
        f'{self._error}. The run stopped; the last complete checkpoint is '
        + (f'step {max(good)}' if good else 'none')
        + '. Free space or fix the directory, then rerun the same command to resume.'
      )

  def wait(self) -> None:
    """Waits for the save in flight; raises CheckpointSaveError if it failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._record(e)
    self.check()

  def close(self) -> None:
    """Waits for the save in flight and releases orbax's threads; never raises for a failed
    save (check() reports those)."""
    try:
      self.manager.close()
    except Exception as e:
      if self._error is None:
        logging.warning('Closing the checkpoint manager: %s', _one_line(e))

  def restore_latest(
    self, abstract_state: Any, shardings: Any, data_iterator: grain.DatasetIterator | None
  ) -> tuple[Any, int] | None:
    """Restores the newest intact step (state, step), or None if the run has no checkpoint.

    A step whose files do not match their checksums is never restored: one line names the step
    and the damage, the step is moved to `workdir/checkpoints.damaged/` (so that the run can
    save that step number again), and the previous step is tried.

    Raises:
      CheckpointDamagedError: every step is damaged (the message says how to start over).
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    damaged = []
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      if not has_manifest(step_dir):
        # Committed by orbax but without checksums: written by a version before them.
        logging.warning(
          'Checkpoint step %d has no checksums (an older version wrote it); '
          'restoring it unverified.',
          step,
        )
        break
      problem = verify_step(step_dir)
      if problem is None:
        break
      damaged.append((step, problem))
      logging.warning(
        'Checkpoint step %d in %s is damaged: %s; falling back to the previous step.',
        step,
        self.directory,
        problem,
      )
    else:
      listing = '; '.join(f'step {s}: {p}' for s, p in damaged)
      raise CheckpointDamagedError(
        f'no intact checkpoint in {self.directory} ({listing}). To start this run over, move '
        f'them away: mv {self.directory} {self.directory}.damaged'
      )
    if damaged:
      self._set_aside([s for s, _ in damaged])
    return restore(self.manager, step, abstract_state, shardings, data_iterator), step

  def _set_aside(self, steps: list[int]) -> None:
    target_root = os.path.join(self.workdir, DAMAGED_DIR)
    if jax.process_index() == 0:
      os.makedirs(target_root, exist_ok=True)
      stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
      for step in steps:
        target = os.path.join(target_root, f'{step}-{stamp}')
        shutil.move(os.path.join(self.directory, str(step)), target)
        logging.warning('Moved the damaged step %d to %s.', step, target)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes('vcmamba_set_aside_damaged_steps')
    self.manager.reload()


def _one_line(e: BaseException) -> str:
  """`Type: first line of the message` (library errors can be pages of JSON and tracebacks)."""
  text = str(e).strip().splitlines()
  first = text[0] if text else ''
  if len(first) > 300:
    first = first[:300] + '...'
  return f'{type(e).__name__}: {first}' if first else type(e).__name__


# ------------------------------------------------------------------------------------------------
# Preemption.
# ------------------------------------------------------------------------------------------------


class PreemptionWatcher:
  """Tells the loop when to save and stop: SIGTERM (preemption) or SIGINT (Ctrl-C).

  The first SIGTERM or SIGINT sets a flag; the loop finishes the save in flight, saves the
  current step and returns 'preempted' (main.py exits with EXIT_PREEMPTED). A second SIGINT
  exits at once without saving (EXIT_INTERRUPTED); further SIGTERMs are ignored (a scheduler's
  grace period is for finishing the save).
  Multi-process jobs: JAX's preemption service (started by `jax.distributed.initialize`) turns a
  SIGTERM on any host into one agreed step for all hosts; `reached(step)` asks it at every step
  (`ocp.multihost.reached_preemption`); a SIGINT is forwarded to it as a SIGTERM.
  Use as a context manager: the previous handlers are restored on exit.
  """

  def __init__(self):
    self._signalled = threading.Event()
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
      for signum in signals:
        self._previous[signum] = signal.signal(signum, self._on_signal)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}

  def _on_signal(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    if self._signalled.is_set():
      if signum == signal.SIGINT:
        os.write(2, f'{name} again: exiting now without saving.\n'.encode())
        os._exit(EXIT_INTERRUPTED)
      logging.warning('%s received again: still saving, then exiting.', name)
      return
    if jax.process_count() > 1 and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service agrees on a step
    logging.warning(
      '%s received: finishing the save in flight, saving the current step, then exiting%s.',
      name,
      ' (Ctrl-C again exits at once without saving)' if signum == signal.SIGINT else '',
    )
    self._signalled.set()

  @property
  def signalled(self) -> bool:
    return self._signalled.is_set()

  def reached(self, step: int) -> bool:
    """Must be called at every step, by every process, from the same first step."""
    if jax.process_count() > 1:
      return ocp.multihost.reached_preemption(step)
    return self._signalled.is_set()


# ------------------------------------------------------------------------------------------------
# Weights from a checkpoint (init_from, eval).
# ------------------------------------------------------------------------------------------------


def _read_only_manager(directory: str) -> ocp.CheckpointManager:
  # Only the 'state' item is read here; a PyTree handler reads its metadata and any subtree.
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  return ocp.CheckpointManager(
    directory, item_handlers={STATE_ITEM: ocp.PyTreeCheckpointHandler()}, options=options
  )


def find_training_checkpoint(path: str | os.PathLike) -> tuple[str, int] | None:
  """(checkpoints directory, step) of the training checkpoint `path` designates, or None if
  `path` is not one of ours.

  `path` may be a workdir or its `checkpoints` directory (the latest step is used), or a step
  directory `.../checkpoints/<step>`. Steps are listed by orbax's read-only manager, so
  unfinished (temporary) saves are never picked.
  """
  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    return None
  name, parent = os.path.basename(path), os.path.dirname(path)
  if name.isdigit() and os.path.isdir(os.path.join(path, STATE_ITEM)):
    with _read_only_manager(parent) as manager:
      if int(name) in manager.all_steps():
        return parent, int(name)
  for directory in (os.path.join(path, CHECKPOINTS_DIR), path):
    if os.path.isdir(directory):
      with _read_only_manager(directory) as manager:
        step = manager.latest_step()
      if step is not None:
        return directory, step
  return None


def read_training_weights(path: str | os.PathLike) -> dict[str, Any]:
  """Reads {'params', 'batch_stats'} and, if present, 'ema' of a saved TrainState as numpy.

  `path`: anything `find_training_checkpoint` accepts. Only these subtrees are read (no
  optimizer state), whatever mesh wrote them.
  """
  found = find_training_checkpoint(path)
  if found is None:
    raise FileNotFoundError(
      f'no training checkpoint at {path} (expected a workdir, its '
      f'{CHECKPOINTS_DIR}/ directory or a step directory)'
    )
  directory, step = found
  with _read_only_manager(directory) as manager:
    tree = manager.item_metadata(step)[STATE_ITEM].tree
    wanted = {k: tree[k] for k in ('params', 'batch_stats', 'ema') if tree.get(k)}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        **{
          STATE_ITEM: ocp.args.PyTreeRestore(
            item=wanted, restore_args=restore_args, partial_restore=True
          )
        }
      ),
    )
  return restored[STATE_ITEM]
