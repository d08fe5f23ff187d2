"""Speed of a config: train/eval img/s, step time, MFU and peak memory (scripts/benchmark.py).

Measured, each after `warmup` untimed steps (compilation included there):
  train_synthetic  the jitted train step (augmentation, the teacher's forward when distilling,
                   forward, backward, AdamW, EMA) on a batch that already lives on the devices:
                   the model's ceiling;
  eval_synthetic   the eval step (forward, top-1/top-5) of the raw weights, likewise;
  train_real       the same train step fed by the real grain pipeline of the config (host decode
                   and augmentation, host-to-device copy);
  pipeline         the input pipeline alone (img/s of this host).
MFU = FLOPs of the compiled step per device (XLA cost analysis of the partitioned program, so
rematerialised work counts) / step time / the device's peak (dense bf16; TF32 for float32 configs
on NVIDIA GPUs, whose default matmul precision is TF32). Peak memory is the largest
`device.memory_stats()['peak_bytes_in_use']` of the local devices since the process started
(absent on CPU); train_synthetic runs first, so its number is the training peak.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from ml_collections import ConfigDict

from vcmamba_jax import data as data_lib
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.train import builders, distillation, steps
from vcmamba_jax.train import state as state_lib

# Dense peak TFLOP/s per device: (bf16, fp32 as the device runs it by default).
# NVIDIA: spec sheets (SXM unless named), fp32 matmuls default to TF32 in XLA. TPU: Cloud TPU docs;
# fp32 matmuls use bf16 passes by default.
PEAK_TFLOPS: tuple[tuple[str, float, float], ...] = (
  ('H100 PCIe', 756.0, 378.0),
  ('H100', 989.4, 494.7),
  ('H200', 989.4, 494.7),
  ('A100', 312.0, 156.0),
  ('TPU v4', 275.0, 275.0),
  ('TPU v5 lite', 197.0, 197.0),  # v5e
  ('TPU v5e', 197.0, 197.0),
  ('TPU v5p', 459.0, 459.0),
  ('TPU v5', 459.0, 459.0),  # v5p reports "TPU v5"
  ('TPU v6 lite', 918.0, 918.0),  # v6e (Trillium)
)


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  """Peak dense TFLOP/s of one device for the compute dtype, or None if unknown (e.g. CPU)."""
  for name, bf16, fp32 in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return bf16 if dtype == 'bfloat16' else fp32
  return None


def _flops_per_device(compiled) -> float | None:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  return float(analysis['flops']) if analysis and 'flops' in analysis else None


def _peak_memory_bytes() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  peaks = [s.get('peak_bytes_in_use') for s in stats if s]
  return max(peaks) if peaks else None


def _timed(run_step, steps: int, warmup: int, block) -> float:
  """Seconds per step of `run_step()` over `steps`, after `warmup` untimed calls."""
  for _ in range(warmup):
    block(run_step())
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = run_step()
  block(out)
  return (time.perf_counter() - start) / steps


def _result(seconds: float, batch: int, flops: float | None, peak: float | None) -> dict[str, Any]:
  images_per_sec = batch / seconds
  result = {
    'step_time_s': seconds,
    'img_per_sec': images_per_sec,
    'img_per_sec_per_device': images_per_sec / jax.device_count(),
    'tflops_per_device': None if flops is None else flops / seconds / 1e12,
    'mfu': None,
  }
  if flops is not None and peak:
    result['mfu'] = flops / seconds / (peak * 1e12)
  return result


def synthetic_batch(
  config: ConfigDict, mesh, batch_size: int, with_mask: bool, seed: int = 1
) -> dict[str, jax.Array]:
  """A random uint8 batch of the config's image size, already sharded on the devices."""
  size = config.model.img_size

  def make(key):
    batch = {
      'image': jax.random.randint(key, (batch_size, size, size, 3), 0, 256, jnp.uint8),
      'label': jax.random.randint(key, (batch_size,), 0, config.model.num_classes),
      'num_skipped': jnp.zeros((batch_size,), jnp.int32),
    }
    if with_mask:
      batch['mask'] = jnp.ones((batch_size,), bool)
    return batch

  return jax.jit(make, out_shardings=sharding_lib.batch_sharding(mesh))(jax.random.PRNGKey(seed))


def setup(config: ConfigDict, steps_per_epoch: int = 1000) -> dict[str, Any]:
  """Model, optimizer, train state, teacher and the jitted train/eval steps of a config.

  The train step is called as `train_step(state, batch, teacher_variables)`.
  """
  mesh = sharding_lib.create_mesh(config.mesh.fsdp)
  model = builders.build_model(config)
  schedule, tx = builders.build_optimizer(config, steps_per_epoch)
  init, _, shardings = builders.abstract_train_state(config, model, tx, mesh)
  state = state_lib.init_sharded(init, jax.random.PRNGKey(config.seed), shardings)
  teacher = distillation.load_teacher(config, mesh)
  return {
    'mesh': mesh,
    'model': model,
    'state': state,
    'shardings': shardings,
    'teacher': teacher,
    'teacher_variables': teacher.variables if teacher else {},
    'train_step': builders.jit_train_step(model, tx, schedule, config, mesh, shardings, teacher),
    'eval_step': builders.jit_eval_step(
      model, mesh, {'': {'params': shardings.params, 'batch_stats': shardings.batch_stats}}
    ),
    'eval_sums': jax.device_put(steps.init_eval_sums(['']), sharding_lib.replicated(mesh)),
  }


def benchmark(
  config: ConfigDict, *, num_steps: int, warmup: int, modes: list[str], peak: float | None = None
) -> dict[str, Any]:
  """Runs the measurements of `modes`; returns a JSON-able dict.

  Also reports the compile times of the train and eval steps (`train_compile_s`,
  `eval_compile_s`: lower + compile; a warm persistent compilation cache shortens them).
  """
  device_kind = jax.devices()[0].device_kind
  peak = peak or peak_tflops(device_kind, config.model.dtype)
  began = time.perf_counter()
  try:
    source = builders.train_source(config)
    steps_per_epoch = builders.steps_per_epoch(config, len(source))
  except (FileNotFoundError, ValueError, ImportError) as e:  # no dataset or no TFDS: synthetic
    source, data_error, steps_per_epoch = None, str(e).splitlines()[0], 1000
  built = setup(config, steps_per_epoch)
  # Progress with times, so that a run cut short by a time limit still says where it was.
  logging.info('benchmark: set up (state initialised) after %.1f s', time.perf_counter() - began)
  mesh, state, teacher = built['mesh'], built['state'], built['teacher']
  teacher_variables = built['teacher_variables']
  size = config.model.img_size
  report: dict[str, Any] = {
    'config': {
      'model': config.model.name,
      'img_size': size,
      'dtype': config.model.dtype,
      'global_batch_size': config.global_batch_size,
      'eval_batch_size': config.eval_batch_size,
      'mesh': dict(mesh.shape),
      # The teacher (type 'soft'/'hard') runs inside the train step; 'none' = no teacher.
      'distillation': distillation.distillation_type(config),
      'teacher': f'{teacher.name} {jnp.dtype(teacher.model.dtype).name}' if teacher else None,
    },
    'device': {
      'kind': device_kind,
      'count': jax.device_count(),
      'processes': jax.process_count(),
      'peak_tflops': peak,
    },
    'results': {},
  }
  results = report['results']
  block = jax.block_until_ready

  batch = synthetic_batch(config, mesh, config.global_batch_size, with_mask=False)
  if {'train_synthetic', 'train_real'} & set(modes):  # B's takes minutes cold: only if timed
    start = time.perf_counter()
    compiled_train = built['train_step'].lower(state, batch, teacher_variables).compile()
    report['train_compile_s'] = time.perf_counter() - start
    logging.info(
      'benchmark: train step compiled in %.1f s (%.1f s in all)',
      report['train_compile_s'],
      time.perf_counter() - began,
    )
    train_flops = _flops_per_device(compiled_train)

  if 'train_synthetic' in modes:
    holder = {'state': state}

    def run_train():
      holder['state'], metrics = compiled_train(holder['state'], batch, teacher_variables)
      return metrics

    seconds = _timed(run_train, num_steps, warmup, block)
    state = holder['state']
    results['train_synthetic'] = _result(seconds, config.global_batch_size, train_flops, peak)
    results['train_synthetic']['peak_memory_bytes'] = _peak_memory_bytes()

  if 'eval_synthetic' in modes:
    weights = {'': state.variables()}
    eval_batch = synthetic_batch(config, mesh, config.eval_batch_size, with_mask=True)
    sums = built['eval_sums']
    start = time.perf_counter()
    compiled_eval = built['eval_step'].lower(weights, eval_batch, sums).compile()
    report['eval_compile_s'] = time.perf_counter() - start
    holder = {'sums': sums}

    def run_eval():
      holder['sums'] = compiled_eval(weights, eval_batch, holder['sums'])
      return holder['sums']

    seconds = _timed(run_eval, num_steps, warmup, block)
    results['eval_synthetic'] = _result(
      seconds, config.eval_batch_size, _flops_per_device(compiled_eval), peak
    )
    results['eval_synthetic']['peak_memory_bytes'] = _peak_memory_bytes()

  if source is None:
    for mode in ('train_real', 'pipeline'):
      if mode in modes:
        results[mode] = {'skipped': data_error}
  elif 'train_real' in modes or 'pipeline' in modes:
    iterator = iter(builders.make_train_dataset(config, source))
    try:
      if 'pipeline' in modes:
        throughput = data_lib.measure_throughput(iterator, num_steps, warmup_batches=warmup)
        results['pipeline'] = {
          'img_per_sec_per_host': throughput['images_per_sec'],
          'batches_per_sec': throughput['batches_per_sec'],
        }
      if 'train_real' in modes:
        holder = {'state': state}

        def run_real():
          host_batch = next(iterator)
          global_batch = sharding_lib.make_global_batch(
            mesh, {k: host_batch[k] for k in builders.TRAIN_KEYS}
          )
          holder['state'], metrics = compiled_train(
            holder['state'], global_batch, teacher_variables
          )
          return metrics

        seconds = _timed(run_real, num_steps, warmup, block)
        results['train_real'] = _result(seconds, config.global_batch_size, train_flops, peak)
    finally:
      iterator.close()
  return report


def format_table(report: dict[str, Any]) -> str:
  """A short fixed-width table of the results."""
  config, device = report['config'], report['device']
  title = (
    f'{config["model"]} {config["img_size"]}px {config["dtype"]} on {device["count"]}x '
    f'{device["kind"]} (peak {device["peak_tflops"] or "?"} TFLOP/s)'
  )
  if config.get('teacher'):
    title += f', {config["distillation"]} distillation from {config["teacher"]}'

  header = (
    f'{"measurement":<16}{"img/s":>10}{"img/s/dev":>11}{"step ms":>10}{"MFU":>8}'
    f'{"peak mem GiB":>14}'
  )
  lines = [title, header]
  for name, r in report['results'].items():
    if 'skipped' in r:
      lines.append(f'{name:<16}skipped: {r["skipped"]}')
    elif name == 'pipeline':
      lines.append(f'{name:<16}{r["img_per_sec_per_host"]:>10.1f}   (per host, no device work)')
    else:
      mfu = '-' if r['mfu'] is None else f'{100 * r["mfu"]:.1f}%'
      mem = r.get('peak_memory_bytes')
      mem = '-' if mem is None else f'{mem / 2**30:.2f}'
      lines.append(
        f'{name:<16}{r["img_per_sec"]:>10.1f}{r["img_per_sec_per_device"]:>11.1f}'
        f'{1000 * r["step_time_s"]:>10.1f}{mfu:>8}{mem:>14}'
      )
  compile_s = [
    f'{what} {report[key]:.1f} s'
    for what, key in (('train step', 'train_compile_s'), ('eval step', 'eval_compile_s'))
    if report.get(key) is not None
  ]
  if compile_s:
    lines.append('compile (lower + compile): ' + ', '.join(compile_s))
  return '\n'.join(lines)
