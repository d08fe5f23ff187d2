"""Runs a script with the Pallas depthwise kernels' launch settings fixed
(`depthwise_pallas.OVERRIDE`), e.g. B's benchmark with `depthwise_impl=pallas` at the setting
that won `ffn_block_variants.py`:

python docs/pending/run_with_depthwise_launch.py '{"rows": 8}' scripts/benchmark.py --config=...
"""

from __future__ import annotations

import json
import runpy
import sys

from vcmamba_jax.models import depthwise_pallas

if __name__ == '__main__':
  setting, script, *rest = sys.argv[1:]
  depthwise_pallas.OVERRIDE = depthwise_pallas.LaunchConfig(**json.loads(setting))
  sys.argv = [script, *rest]
  runpy.run_path(script, run_name='__main__')
