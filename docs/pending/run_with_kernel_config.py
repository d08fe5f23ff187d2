"""Runs a script with a Pallas kernel's launch settings fixed: the fused scan's
(`scan_pallas.OVERRIDE`, a `KernelConfig`) or, with --depthwise first, the depthwise conv's
(`depthwise_pallas.OVERRIDE`, a `LaunchConfig`). Leading --fuse_bn_backward and/or
--pallas_bn_sums also set `ops.FUSE_BN_BACKWARD` (norm1's backward sums in the depthwise conv's
backward kernel) and `ops.PALLAS_BN_SUMS` (BatchNorm's backward sums as a Pallas kernel).

python docs/pending/run_with_kernel_config.py '{"group": 1}' scripts/benchmark.py --config=...
python docs/pending/run_with_kernel_config.py --depthwise '{"rows": 8}' scripts/benchmark.py ...
python docs/pending/run_with_kernel_config.py --fuse_bn_backward --depthwise '{}' scripts/...
"""

from __future__ import annotations

import json
import runpy
import sys

from vcmamba_jax.models import depthwise_pallas, ops, scan_pallas

if __name__ == '__main__':
  args = sys.argv[1:]
  while args[0] in ('--fuse_bn_backward', '--pallas_bn_sums'):
    setattr(ops, args.pop(0)[2:].upper(), True)
  depthwise = args[0] == '--depthwise'
  setting, script, *rest = args[1:] if depthwise else args
  if depthwise:
    depthwise_pallas.OVERRIDE = depthwise_pallas.LaunchConfig(**json.loads(setting))
  else:
    scan_pallas.OVERRIDE = scan_pallas.KernelConfig(**json.loads(setting))
  sys.argv = [script, *rest]
  runpy.run_path(script, run_name='__main__')
