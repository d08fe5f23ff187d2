"""The training loop (`train_and_evaluate`) and checkpoint evaluation (`evaluate`).

Data flows one way: config -> mesh -> input pipeline -> sharded state -> jitted steps ->
metrics and checkpoints. Rerunning the same command with the same workdir resumes from the
latest checkpoint, with the same data order and randomness as an uninterrupted run. The
builders of each stage live in `vcmamba_jax.train.builders` (shared with the benchmark, AOT
compilation and the other programs) and the multi-host set-up in `vcmamba_jax.distributed`;
this module holds only the loop and evaluation.
"""

from __future__ import annotations

import json
import os
import time
import types
from collections.abc import Mapping
from typing import Any

import grain
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from vcmamba_jax import checkpoint as checkpoint_lib
from vcmamba_jax import data as data_lib
from vcmamba_jax import distributed
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.train import builders, distillation, steps
from vcmamba_jax.train import metrics as metrics_lib
from vcmamba_jax.train import state as state_lib
from vcmamba_jax.train import validate as validate_lib
from vcmamba_jax.train import workdir as workdir_lib
from vcmamba_jax.train.hooks import Hooks

EVAL_PROGRESS_SECONDS = 30.0


class TrainingDivergedError(FloatingPointError):
  """The loss or the gradients became NaN/Inf (and skip_nonfinite_updates is off)."""


def run(config: ConfigDict, workdir: str, hooks: Hooks | None = None) -> dict[str, Any]:
  """Entry point of `main.py` (and notebooks): `config.mode` 'train' or 'eval'.

  The config is validated first (`validate.ConfigError`, one line, nothing touched). `hooks`:
  callbacks for tests (see `Hooks`).
  """
  validate_lib.validate_config(config)
  distributed.initialize(config.distributed)
  metrics_lib.quiet_library_logs()
  builders.enable_compilation_cache(config.get('compilation_cache_dir', 'auto'), workdir)
  if config.mode == 'train':
    return train_and_evaluate(config, workdir, hooks=hooks)
  if config.mode == 'eval':
    return evaluate(config, workdir)
  raise ValueError(f"config.mode must be 'train' or 'eval', got {config.mode!r}")


def run_evaluation(
  eval_step,
  weights: Mapping[str, Any],
  dataset: grain.IterDataset,
  mesh: Mesh,
  num_batches: int | None = None,
  announce_compile: bool = True,
) -> dict[str, float]:
  """One exact pass over the eval split for every weight set: top1/top5/loss (+ ema_*).

  Logs a compile notice before the first batch (`announce_compile`), then progress with an ETA
  (from `num_batches`, the batches of the pass) after the first batch and every
  `EVAL_PROGRESS_SECONDS` (a full ImageNet pass takes minutes)."""
  sums = jax.device_put(steps.init_eval_sums(list(weights)), sharding_lib.replicated(mesh))
  iterator = iter(dataset)
  total = '?' if num_batches is None else str(num_batches)
  start = last_log = time.perf_counter()
  done = 0
  try:
    for batch in iterator:
      batch = sharding_lib.make_global_batch(mesh, {k: batch[k] for k in builders.EVAL_KEYS})
      if done == 0 and announce_compile:
        logging.info('Compiling the eval step (the first eval batch)...')
      sums = eval_step(weights, batch, sums)
      done += 1
      if done == 1 or time.perf_counter() - last_log > EVAL_PROGRESS_SECONDS:
        jax.block_until_ready(sums)
        last_log = time.perf_counter()
        eta = None if num_batches is None else (last_log - start) / done * (num_batches - done)
        logging.info(
          'eval: %d/%s batches in %.0f s, ETA %s',
          done,
          total,
          last_log - start,
          metrics_lib.format_duration(eta),
        )
  finally:
    iterator.close()
  results = steps.summarize_eval(jax.device_get(sums))
  logging.info('eval: %d batches in %.1f s', done, time.perf_counter() - start)
  return results


CLASS_NAMES_FILE = 'class_names.txt'


# ------------------------------------------------------------------------------------------------
# Tasks: what differs between classification and dense prediction, behind one interface.
# ------------------------------------------------------------------------------------------------


def _classification_task() -> types.SimpleNamespace:
  def jit_eval(model, config, mesh, weight_shardings):
    return builders.jit_eval_step(model, mesh, weight_shardings)

  def load(path, model, config, *, with_ema=False, reinit_heads=False, fresh=None):
    del fresh
    return builders.load_weights(path, model, config, with_ema=with_ema, reinit_heads=reinit_heads)

  return types.SimpleNamespace(
    TRAIN_KEYS=builders.TRAIN_KEYS,
    EVAL_KEYS=builders.EVAL_KEYS,
    check_data=builders.check_num_classes,
    train_source=builders.train_source,
    eval_source=lambda c: builders.open_source(c, c.data.eval_split),
    steps_per_epoch=builders.steps_per_epoch,
    make_train_dataset=builders.make_train_dataset,
    make_eval_dataset=builders.make_eval_dataset,
    build_model=builders.build_model,
    build_optimizer=builders.build_optimizer,
    make_loss_fn=lambda model, config: None,  # the classification loss of steps.make_train_step
    jit_eval_step=jit_eval,
    run_evaluation=run_evaluation,
    load_weights=load,
    format_eval=_format_eval,
  )


def get_task(config: ConfigDict):
  """The task of `config.task`: 'classification' (default) or 'segmentation'
  (`vcmamba_jax.segmentation.task`)."""
  name = config.get('task', 'classification')
  if name == 'classification':
    return _classification_task()
  if name == 'segmentation':
    from vcmamba_jax.segmentation import task as segmentation_task

    return segmentation_task
  raise ValueError(f"config.task must be 'classification' or 'segmentation', got {name!r}")


def _write_class_names(config: ConfigDict, workdir: str) -> None:
  """An image folder's class names, one per line in label order, for predict.py."""
  folder = builders.image_folder(config)
  if folder is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, CLASS_NAMES_FILE), 'w') as f:
      f.write(''.join(f'{name}\n' for name in folder.classes))


# ------------------------------------------------------------------------------------------------
# Training.
# ------------------------------------------------------------------------------------------------


def train_and_evaluate(
  config: ConfigDict, workdir: str, hooks: Hooks | None = None
) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming from its latest intact checkpoint) and evaluates.

  The workdir is locked for the run (`workdir.WorkdirLock`); a resume checks the stored config
  (`workdir.check_resume_config`) before anything is loaded.

  Returns:
    The last logged train metrics and eval metrics (`train/...`, `eval/...`), plus
    'preempted': True when the run stopped early on SIGTERM/SIGINT (after saving a checkpoint).
  """
  hooks = hooks or Hooks()
  workdir = os.path.abspath(workdir)
  builders.check_batch_sizes(config)
  builders.check_compiler(config, jax.devices()[0].device_kind)
  get_task(config).check_data(config)
  lock = workdir_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
  if lock is not None:
    lock.acquire()
  try:
    resuming = checkpoint_lib.find_training_checkpoint(workdir) is not None
    if resuming and (stored := workdir_lib.stored_config(workdir)) is not None:
      workdir_lib.check_resume_config(stored, config)
    if config.init_from and not resuming:
      builders.fetch_hub_weights(config.init_from)
    if jax.process_index() == 0:
      workdir_lib.write_config_history(config, workdir)
    _write_class_names(config, workdir)
    with checkpoint_lib.PreemptionWatcher() as preemption:
      return _train(config, workdir, hooks, preemption)
  finally:
    if lock is not None:
      lock.release()


def _train(
  config: ConfigDict, workdir: str, hooks: Hooks, preemption: checkpoint_lib.PreemptionWatcher
) -> dict[str, Any]:
  # ----------------------------------------------------------------------------------------------
  # Mesh and input pipeline.
  # ----------------------------------------------------------------------------------------------
  mesh = sharding_lib.create_mesh(config.mesh.fsdp)
  logging.info(
    '%d processes, %d devices (%s), mesh %s',
    jax.process_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
    dict(mesh.shape),
  )
  # The teacher first: a missing teacher file stops the run before any data is read.
  teacher = distillation.load_teacher(config, mesh)
  distillation.record_teacher(teacher, workdir)
  task = get_task(config)
  train_source = task.train_source(config)
  steps_per_epoch = task.steps_per_epoch(config, len(train_source))
  total_steps = builders.total_train_steps(config, steps_per_epoch)
  eval_dataset = task.make_eval_dataset(config)
  num_eval_batches = data_lib.eval_num_batches(
    len(task.eval_source(config)),
    config.eval_batch_size,
    jax.process_count(),
  )
  logging.info(
    '%d train records, %d steps per epoch, %d steps in total (%.2f epochs).',
    len(train_source),
    steps_per_epoch,
    total_steps,
    total_steps / steps_per_epoch,
  )

  # ----------------------------------------------------------------------------------------------
  # Model, optimizer and the sharded state: restored, pretrained or fresh.
  # ----------------------------------------------------------------------------------------------
  model = task.build_model(config)
  schedule, tx = task.build_optimizer(config, steps_per_epoch)
  init, abstract_state, shardings = builders.abstract_train_state(config, model, tx, mesh)
  rng = jax.random.PRNGKey(config.seed)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))
  logging.info('%s: %.2fM parameters', config.model.name, num_params / 1e6)

  ckpts = checkpoint_lib.RunCheckpoints(
    workdir, keep=config.keep_checkpoints, storage_hook=hooks.storage
  )
  train_iter = iter(task.make_train_dataset(config, train_source))
  writer = None
  try:
    restored = ckpts.restore_latest(abstract_state, shardings, train_iter)
    if restored is not None:
      state, restored_step = restored
      logging.info('Resumed from %s/%d.', ckpts.directory, restored_step)
    else:
      logging.info('Initialising the model state (compiling the initialiser)...')
      state = state_lib.init_sharded(init, rng, shardings)
      if config.init_from:
        weights, source = task.load_weights(
          config.init_from, model, config, reinit_heads=True, fresh=state.variables()
        )
        state = state_lib.with_pretrained(state, shardings, weights[''])
        logging.info('Initialised the weights from %s.', source.description)
    start_step = int(jax.device_get(state.step))
    writer = metrics_lib.MetricWriter(workdir, resume_step=start_step)
    return _loop(
      config,
      hooks,
      preemption,
      ckpts,
      writer,
      train_iter,
      eval_dataset,
      state=state,
      start_step=start_step,
      total_steps=total_steps,
      steps_per_epoch=steps_per_epoch,
      num_eval_batches=num_eval_batches,
      model=model,
      tx=tx,
      schedule=schedule,
      mesh=mesh,
      shardings=shardings,
      teacher=teacher,
    )
  finally:
    ckpts.close()  # waits for a save in flight
    if writer is not None:
      writer.close()
    train_iter.close()


def _loop(
  config: ConfigDict,
  hooks: Hooks,
  preemption: checkpoint_lib.PreemptionWatcher,
  ckpts: checkpoint_lib.RunCheckpoints,
  writer: metrics_lib.MetricWriter,
  train_iter,
  eval_dataset,
  *,
  state,
  start_step: int,
  total_steps: int,
  steps_per_epoch: int,
  num_eval_batches: int,
  model,
  tx,
  schedule,
  mesh: Mesh,
  shardings,
  teacher,
) -> dict[str, Any]:
  teacher_variables = teacher.variables if teacher else {}

  # ----------------------------------------------------------------------------------------------
  # Jitted steps: explicit shardings, donated state.
  # ----------------------------------------------------------------------------------------------
  task = get_task(config)
  train_step = builders.jit_train_step(
    model, tx, schedule, config, mesh, shardings, teacher, task.make_loss_fn(model, config)
  )
  eval_shardings = {'': {'params': shardings.params, 'batch_stats': shardings.batch_stats}}
  if shardings.ema:
    eval_shardings['ema'] = shardings.ema
  eval_step = task.jit_eval_step(model, config, mesh, eval_shardings)

  evals_done = 0

  def evaluate_now(step: int) -> dict[str, Any]:
    nonlocal evals_done
    results = task.run_evaluation(
      eval_step,
      state.eval_weights(),
      eval_dataset,
      mesh,
      num_batches=num_eval_batches,
      announce_compile=evals_done == 0,
    )
    evals_done += 1
    results = {f'eval/{k}': v for k, v in results.items()}
    writer.write(step, results)
    logging.info('eval @ step %d: %s', step, task.format_eval(results))
    return results

  # ----------------------------------------------------------------------------------------------
  # The loop.
  # ----------------------------------------------------------------------------------------------
  chrono = metrics_lib.Chrono(total_steps, config.global_batch_size)
  pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet fetched
  last_checked = start_step  # metrics of steps up to here were finite
  summary: dict[str, Any] = {}

  def flush(step: int) -> dict[str, Any]:
    """Fetches the pending metrics, stops on a non-finite update, writes the averages."""
    nonlocal pending, last_checked
    fetched = jax.device_get([m for _, m in pending])
    step_ids = [s for s, _ in pending]
    pending = []
    if not config.skip_nonfinite_updates:
      _raise_if_diverged(step_ids, fetched, last_checked, ckpts.manager)
    last_checked = step
    logged = {
      'epoch': step / steps_per_epoch,
      **{f'train/{k}': v for k, v in _average(fetched).items()},
      **{f'train/{k}': v for k, v in chrono.measure(step).items()},
    }
    writer.write(step, logged)
    metrics_lib.log_progress(
      step, total_steps, step / steps_per_epoch, logged, chrono.eta_seconds(step)
    )
    return logged

  if preemption.reached(start_step):  # signalled while loading: nothing new to save
    logging.warning('Stopped before the first step; the checkpoints are unchanged.')
    return {**summary, 'preempted': True}
  if start_step >= total_steps:
    logging.info('Training already finished at step %d.', start_step)
    summary.update(evaluate_now(start_step))
  for step in range(start_step + 1, total_steps + 1):
    ckpts.check()  # a failed background save stops the run here, in one line
    batch = next(train_iter)
    batch = sharding_lib.make_global_batch(mesh, {k: batch[k] for k in task.TRAIN_KEYS})
    if not chrono.started:
      logging.info('Compiling the train step (the first step)...')
      compile_start = time.perf_counter()
    state, step_metrics = train_step(state, batch, teacher_variables)
    pending.append((step, step_metrics))
    if not chrono.started:  # the first step compiled: time from its end
      jax.block_until_ready(step_metrics)
      chrono.start(step)
      logging.info(
        'First step done in %.1f s (compilation included).', time.perf_counter() - compile_start
      )
    if hooks.after_step is not None:
      hooks.after_step(step)
    if hooks.edit_state is not None:
      state = hooks.edit_state(step, state) or state

    preempted = preemption.reached(step)
    is_last = step == total_steps
    epoch_done, epoch = step % steps_per_epoch == 0, step // steps_per_epoch
    do_eval = is_last or (
      epoch_done and config.eval_every_epochs > 0 and epoch % config.eval_every_epochs == 0
    )
    every_steps = config.get('eval_every_steps', 0)
    do_eval = do_eval or (every_steps > 0 and step % every_steps == 0)
    do_save = is_last or preempted or step % config.checkpoint_every_steps == 0
    if do_eval or do_save or step % config.log_every_steps == 0:
      summary.update(flush(step))  # checks for NaN/Inf before anything is saved
    chrono.pause()  # checkpoints and evals don't count as training time
    if do_save:
      ckpts.save(step, state, train_iter)
    if preempted:
      ckpts.wait()
      logging.warning(
        'Preempted: saved step %d in %s. Rerun the same command to resume (exit code %d).',
        step,
        ckpts.directory,
        checkpoint_lib.EXIT_PREEMPTED,
      )
      return {**summary, 'preempted': True}
    if do_eval:
      summary.update(evaluate_now(step))
    chrono.resume()
  ckpts.wait()
  return summary


_STEP_METRICS = {
  'loss',
  'grad_norm',
  'param_norm',
  'lr',
  'update_ok',
  'skipped_updates',
  'skipped_records',
}


def _average(fetched: list[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Averages over a log interval; sums the skipped records; the rest from the last step."""
  ok = [m for m in fetched if m['update_ok']]
  out: dict[str, Any] = {}
  for key in ('loss', 'grad_norm'):
    values = [float(m[key]) for m in ok]
    out[key] = float(np.mean(values)) if values else float('nan')
  last = fetched[-1]
  for key in sorted(set(last) - _STEP_METRICS):  # a task's own metrics (e.g. acc_seg)
    values = [float(m[key]) for m in ok]
    out[key] = float(np.mean(values)) if values else float('nan')
  out['param_norm'] = float(last['param_norm'])
  out['lr'] = float(last['lr'])
  out['skipped_updates'] = int(last['skipped_updates'])
  if 'skipped_records' in last:
    out['skipped_records'] = int(sum(int(m['skipped_records']) for m in fetched))
  return out


def _raise_if_diverged(
  step_ids: list[int], fetched: list[dict[str, np.ndarray]], last_checked: int, manager
) -> None:
  bad = [(s, m) for s, m in zip(step_ids, fetched) if not m['update_ok']]
  if not bad:
    return
  first_step, first = bad[0]
  loss, grad_norm = float(first['loss']), float(first['grad_norm'])
  what = 'loss' if not np.isfinite(loss) else 'gradients'
  kind = 'nan' if np.isnan(loss if what == 'loss' else grad_norm) else 'inf'
  manager.wait_until_finished()
  good = manager.latest_step()
  raise TrainingDivergedError(
    f'{what} became {kind} between steps {last_checked + 1} and {step_ids[-1]} (first at '
    f'step {first_step}: loss={loss}, grad_norm={grad_norm}). Nothing was saved after step '
    f'{last_checked}; the last checkpoint is '
    + (f'step {good} in {manager.directory}' if good is not None else 'none')
    + '. Lower the learning rate, or set --config.skip_nonfinite_updates=True to skip such '
    'updates.'
  )


def _format_eval(results: Mapping[str, Any]) -> str:
  keys = [
    k
    for k in results
    if k.split('/')[-1] in ('top1', 'top5', 'loss', 'ema_top1', 'ema_top5', 'ema_loss')
  ]
  return ', '.join(f'{k.split("/")[-1]} {results[k]:.4f}' for k in keys)


# ------------------------------------------------------------------------------------------------
# Evaluation of a checkpoint or of pretrained weights.
# ------------------------------------------------------------------------------------------------


def evaluate(config: ConfigDict, workdir: str) -> dict[str, Any]:
  """Evaluates `config.eval_from` (default: the workdir's latest checkpoint, else
  `config.init_from`) on `config.data.eval_split`: top-1/top-5/loss of the weights and, for
  our checkpoints, of their EMA. Results go to the log, metrics.jsonl and the return value."""
  workdir = os.path.abspath(workdir)
  builders.check_batch_sizes(config)
  source = config.eval_from
  if not source and checkpoint_lib.find_training_checkpoint(workdir) is not None:
    source = workdir
  source = source or config.init_from
  if not source:
    raise ValueError(
      f'Nothing to evaluate: {workdir} has no checkpoint and neither config.eval_from nor '
      'config.init_from is set. Pass --config.eval_from=<workdir, checkpoint, exported model '
      'dir or PyTorch file>.'
    )

  mesh = sharding_lib.create_mesh(config.mesh.fsdp)
  task = get_task(config)
  task.check_data(config)
  model = task.build_model(config)
  weights, read = task.load_weights(source, model, config, with_ema=True)
  abstract = jax.eval_shape(lambda: weights)
  weight_shardings = sharding_lib.state_shardings(mesh, abstract, config.mesh.fsdp_min_size)
  weights = {
    name: state_lib.put_variables(w, weight_shardings[name]) for name, w in weights.items()
  }
  eval_step = task.jit_eval_step(model, config, mesh, weight_shardings)
  num_batches = data_lib.eval_num_batches(
    len(task.eval_source(config)),
    config.eval_batch_size,
    jax.process_count(),
  )
  results = task.run_evaluation(
    eval_step, weights, task.make_eval_dataset(config), mesh, num_batches=num_batches
  )
  results = {f'eval/{k}': v for k, v in results.items()}
  step = read.step or 0
  writer = metrics_lib.MetricWriter(workdir)
  try:
    writer.write(step, {**results, 'eval/source': read.description})
  finally:
    writer.close()
  logging.info('eval of %s: %s', read.description, task.format_eval(results))
  if jax.process_index() == 0:
    logging.info('%s', json.dumps(results))
  return results
