r"""Training and evaluation speed of a config: img/s, step time, MFU, peak memory.

  python scripts/benchmark.py --config=vcmamba_jax/configs/vcmamba_b.py --config.model.dtype=bfloat16 \
      --config.distillation.type=none \
      --config.data.data_dir=$TFDS_DATA_DIR --json_out=bench_b_bf16.json
  python scripts/benchmark.py --config=vcmamba_jax/configs/vcmamba_s.py:smoke   # CPU check, seconds
  # a batch sweep (train and eval at each global batch size), for scripts/plot_benchmark.py
  python scripts/benchmark.py --config=vcmamba_jax/configs/vcmamba_b.py --config.model.dtype=bfloat16 \
      --config.distillation.type=none \
      --modes=train_synthetic,eval_synthetic --batch_sizes=32,64,128,256,512 --json_out=sweep_b.json
  # the recipe's train step with its RegNetY-160 teacher (random weights run at the same speed)
  python scripts/benchmark.py --config=vcmamba_jax/configs/vcmamba_b.py --config.model.dtype=bfloat16 \
      --config.distillation.teacher_path=random --config.distillation.dtype=bfloat16 \
      --modes=train_synthetic --json_out=bench_b_bf16_teacher.json

Prints a table and optionally writes JSON. What is measured and how MFU is defined:
`vcmamba_jax/train/benchmark.py`. Without the config's dataset only the synthetic measurements
run. Override the device peak (TFLOP/s) with --peak_tflops.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from vcmamba_jax import distributed
from vcmamba_jax.train import benchmark as benchmark_lib
from vcmamba_jax.train import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (as for main.py).', lock_config=True
)
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per measurement.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 3, 'Untimed steps first (compilation).')
_MODES = flags.DEFINE_list(
  'modes', 'train_synthetic,eval_synthetic,train_real,pipeline', 'What to measure.'
)
_PEAK = flags.DEFINE_float('peak_tflops', None, 'Peak TFLOP/s per device (default: table).')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Write the results as JSON here.')
_BATCH_SIZES = flags.DEFINE_list(
  'batch_sizes',
  [],
  'Sweep: measure at each of these global batch sizes (train and eval batch alike); the JSON '
  'then holds {"sweep": [report, ...]}.',
)
flags.mark_flags_as_required(['config'])


def sweep_report(reports: list[dict]) -> dict:
  """The JSON of a batch sweep: the reports in order of batch size."""
  return {
    'sweep': sorted(reports, key=lambda r: r['config']['global_batch_size']),
    'jax_version': jax.__version__,
  }


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics_lib.quiet_library_logs()
  config = _CONFIG.value
  distributed.initialize(config.distributed)
  batch_sizes = [int(b) for b in _BATCH_SIZES.value] or [None]
  reports = []
  for number, batch in enumerate(batch_sizes, start=1):
    if batch is not None:
      config.global_batch_size = config.eval_batch_size = batch
      logging.info('sweep %d/%d: global batch %d', number, len(batch_sizes), batch)
    report = benchmark_lib.benchmark(
      config,
      num_steps=_STEPS.value,
      warmup=_WARMUP.value,
      modes=_MODES.value,
      peak=_PEAK.value,
    )
    reports.append(report)
    if jax.process_index() == 0:
      print(benchmark_lib.format_table(report), flush=True)
  if jax.process_index() == 0 and _JSON_OUT.value:
    out = sweep_report(reports) if _BATCH_SIZES.value else reports[0]
    with open(_JSON_OUT.value, 'w') as f:
      json.dump(out, f, indent=2)
    logging.info('Wrote %s', _JSON_OUT.value)


if __name__ == '__main__':
  app.run(main)
