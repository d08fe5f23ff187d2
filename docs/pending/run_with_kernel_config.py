"""Runs a script with the pending fused scan's launch settings fixed (`scan_pallas.OVERRIDE`).

python docs/pending/run_with_kernel_config.py '{"group": 1}' scripts/benchmark.py --config=...
"""

from __future__ import annotations

import json
import runpy
import sys

from vcmamba_jax.models import scan_pallas

if __name__ == '__main__':
  setting, script, *rest = sys.argv[1:]
  scan_pallas.OVERRIDE = scan_pallas.KernelConfig(**json.loads(setting))
  sys.argv = [script, *rest]
  runpy.run_path(script, run_name='__main__')
