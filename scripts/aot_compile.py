r"""Compiles a config's training program for a Cloud TPU slice on this (CPU) host: memory per
chip against HBM, FLOPs, HBM traffic and collectives per step, without a TPU.

  python scripts/aot_compile.py --config=vcmamba_jax/configs/vcmamba_b.py --topology=v5e:16x16 \
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

# This host only compiles: JAX runs on the CPU (no attempt to open a TPU), libtpu is only the
# compiler, so several compiles may share it, and its start-up warnings about the missing TPU are
# silenced.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('TPU_STDERR_LOG_LEVEL', '3')
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
_APPEND_TO = flags.DEFINE_string(
  'append_to', None, 'Also append the report to this JSON list (e.g. docs/tpu_aot_results.json).'
)
_TABLE_FROM = flags.DEFINE_string(
  'table_from', None, 'Print the README table of a JSON list of reports and exit (no compile).'
)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _TABLE_FROM.value:
    with open(_TABLE_FROM.value) as f:
      reports = json.load(f)
    print(aot.markdown_table(reports))
    print('\nLargest batch per chip, estimated from these compiles:\n')
    print(aot.capacity_table(reports))
    return
  if not _CONFIG.value or not _TOPOLOGY.value:
    raise app.UsageError('--config and --topology are required')
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
  if _APPEND_TO.value:
    reports = []
    if os.path.exists(_APPEND_TO.value):
      with open(_APPEND_TO.value) as f:
        reports = json.load(f)
    with open(_APPEND_TO.value, 'w') as f:
      json.dump(reports + [report], f, indent=1)
  print(json.dumps(report))


if __name__ == '__main__':
  app.run(main)
