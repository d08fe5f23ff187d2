r"""Training and evaluation speed of a config: img/s, step time, MFU, peak memory.

  python scripts/benchmark.py --config=configs/vcmamba_b.py --config.model.dtype=bfloat16 \
      --config.data.data_dir=$TFDS_DATA_DIR --json_out=bench_b_bf16.json
  python scripts/benchmark.py --config=configs/vcmamba_s.py:smoke   # CPU check, seconds

Prints a table and optionally writes JSON. What is measured and how MFU is defined:
`vcmamba_jax/train/benchmark.py`. Without the config's dataset only the synthetic measurements
run. Override the device peak (TFLOP/s) with --peak_tflops.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

import jax

from vcmamba_jax.train import benchmark as benchmark_lib
from vcmamba_jax.train import metrics as metrics_lib
from vcmamba_jax.train import trainer

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
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics_lib.quiet_library_logs()
  trainer.initialize_distributed(_CONFIG.value.distributed)
  report = benchmark_lib.benchmark(
    _CONFIG.value,
    num_steps=_STEPS.value,
    warmup=_WARMUP.value,
    modes=_MODES.value,
    peak=_PEAK.value,
  )
  if jax.process_index() == 0:
    print(benchmark_lib.format_table(report))
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, 'w') as f:
        json.dump(report, f, indent=2)
      logging.info('Wrote %s', _JSON_OUT.value)


if __name__ == '__main__':
  app.run(main)
