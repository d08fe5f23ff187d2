"""Segmentation speed: train img/s of the real jitted step and slide-inference img/s of the real
eval step (the trainer's task pieces), on synthetic device data, one compile each.

Train: uint8 crops [global_batch, crop, crop, 3] and labels; the measured step is the trainer's
(normalise, forward/backward of the Semantic FPN in train mode, CE, AdamW, NaN guard).
Slide: images of ``eval_size`` (default 512 x 704, a typical AlignResized ADE20K image) on a
canvas of the same size; the step is the eval step of training (windows of config.eval.crop /
stride, logits resized to the original size, argmax, per-class areas).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from ml_collections import ConfigDict

from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.segmentation import task as task_lib
from vcmamba_jax.train import builders
from vcmamba_jax.train import state as state_lib
from vcmamba_jax.train.benchmark import _peak_memory_bytes


def _time(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def benchmark(
  config: ConfigDict,
  *,
  num_steps: int = 10,
  warmup: int = 2,
  modes=('train', 'slide'),
  eval_size: tuple[int, int] = (512, 704),
) -> dict[str, Any]:
  """{'train': {img_per_sec, step_time, ...}, 'slide': {...}} for ``config`` (a segmentation
  config); batch sizes are the config's global_batch_size / eval_batch_size."""
  mesh = sharding_lib.create_mesh(config.mesh.fsdp)
  model = task_lib.build_model(config)
  schedule, tx = task_lib.build_optimizer(config, 1)
  init = state_lib.make_initializer(model, tx, image_size=config.model.img_size, use_ema=False)
  rng = jax.random.PRNGKey(0)
  abstract = jax.eval_shape(init, rng)
  shardings = sharding_lib.state_shardings(mesh, abstract, config.mesh.fsdp_min_size)
  state = state_lib.init_sharded(init, rng, shardings)
  report: dict[str, Any] = {
    'model': config.model.name,
    'dtype': config.model.dtype,
    'devices': jax.device_count(),
    'device_kind': jax.devices()[0].device_kind,
  }
  data_rng = np.random.default_rng(0)
  if 'train' in modes:
    b, crop = config.global_batch_size, config.model.img_size
    batch = sharding_lib.make_global_batch(
      mesh,
      {
        'image': data_rng.integers(0, 256, (b, crop, crop, 3), dtype=np.uint8),
        'label': data_rng.integers(0, 150, (b, crop, crop), dtype=np.uint8),
        'size': np.full((b, 2), crop, np.int32),
        'num_skipped': np.zeros((b,), np.int32),
      },
    )
    step = builders.jit_train_step(
      model,
      tx,
      schedule,
      config,
      mesh,
      shardings,
      task_loss_fn=task_lib.make_loss_fn(model, config),
    )
    holder = {'state': state}

    def run():
      holder['state'], metrics = step(holder['state'], batch, {})  # no teacher
      return metrics['loss']

    seconds = _time(run, num_steps, warmup)
    report['train'] = {
      'batch': b,
      'crop': crop,
      'step_time': seconds,
      'img_per_sec': b / seconds,
      'peak_memory_bytes': _peak_memory_bytes(),
    }
    state = holder['state']
  if 'slide' in modes:
    e = config.eval.copy_and_resolve_references()
    with e.unlocked():
      e.image_canvas = tuple(eval_size)
      e.label_canvas = tuple(eval_size)
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.eval = e
    b = config.eval_batch_size
    batch = sharding_lib.make_global_batch(
      mesh,
      {
        'image': data_rng.integers(0, 256, (b, *eval_size, 3), dtype=np.uint8),
        'label': data_rng.integers(0, 151, (b, *eval_size), dtype=np.uint8),
        'size': np.tile(np.asarray(eval_size, np.int32), (b, 1)),
        'orig_size': np.tile(np.asarray(eval_size, np.int32), (b, 1)),
        'mask': np.ones((b,), bool),
        'num_skipped': np.zeros((b,), np.int32),
      },
    )
    weights = {'': state.variables()}
    weight_shardings = {'': {'params': shardings.params, 'batch_stats': shardings.batch_stats}}
    eval_step = task_lib.jit_eval_step(model, cfg, mesh, weight_shardings)
    seconds = _time(lambda: eval_step(weights, batch), num_steps, warmup)
    report['slide'] = {
      'batch': b,
      'image_size': list(eval_size),
      'crop': config.eval.crop,
      'stride': config.eval.stride,
      'step_time': seconds,
      'img_per_sec': b / seconds,
      'peak_memory_bytes': _peak_memory_bytes(),
    }
  return report


def format_table(report: dict[str, Any]) -> str:
  lines = [
    f'{report["model"]} ({report["dtype"]}) on {report["devices"]} x {report["device_kind"]}'
  ]
  for mode in ('train', 'slide'):
    if mode in report:
      r = report[mode]
      mem = r.get('peak_memory_bytes')
      mem = f', peak {mem / 2**30:.1f} GiB' if mem else ''
      lines.append(
        f'  {mode:5s} batch {r["batch"]}: {r["img_per_sec"]:.1f} img/s, '
        f'{1000 * r["step_time"]:.1f} ms/step{mem}'
      )
  return '\n'.join(lines)
