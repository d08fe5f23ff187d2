r"""Compiles a config's training program for a Cloud TPU slice on this (CPU) host: memory per
chip against HBM, FLOPs, HBM traffic and collectives per step, without a TPU.

  python scripts/aot_compile.py --config=configs/vcmamba_b.py --topology=v5e:16x16 \
      --per_chip_batch=128 --config.model.dtype=bfloat16 [--config.mesh.fsdp=4] [--json_out=r.json]

Needs libtpu (pip install -e ".[tpu]"). The programs are the exact jitted train and eval steps of
main.py (vcmamba_jax/train/aot.py); scan_impl 'auto' resolves as on a TPU. Prints a table, then
the report as one line of JSON (last line). Exit status 0 also when the step does not fit
(`"fits": false` in the JSON).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/
os.environ.setdefault('TPU_STDERR_LOG_LEVEL', '3')  # libtpu: no start-up warnings (no TPU here)
os.environ.setdefault('TPU_MIN_LOG_LEVEL', '3')

from absl import app, flags
from ml_collections import config_flags

from vcmamba_jax.train import aot
from vcmamba_jax.train import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (as for main.py).', lock_config=True
)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice, e.g. v5e:16x16, v4:4x4x4, v6e:8x8.')
_PER_CHIP = flags.DEFINE_integer(
  'per_chip_batch', None, 'Images per chip (default: config.global_batch_size / chips).'
)
_NO_EVAL = flags.DEFINE_bool('skip_eval', False, 'Compile the train step only.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Also write the report here.')
flags.mark_flags_as_required(['config', 'topology'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics_lib.quiet_library_logs()
  try:
    report = aot.compile_for_topology(
      _CONFIG.value, _TOPOLOGY.value, per_chip_batch=_PER_CHIP.value, with_eval=not _NO_EVAL.value
    )
  except ValueError as e:
    sys.exit(f'error: {e}')
  print(aot.format_report(report))
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, 'w') as f:
      json.dump(report, f, indent=2)
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)
