"""Times launch settings of the pending fused scan (`scan_pallas.KernelConfig`) at B's shapes.

Run from the root of a tree with `fused_scan_direction_groups.patch` applied, on the GPU:

  python docs/pending/scan_sweep.py --batch 128 --json sweep.json

Each setting is checked against the sequential reference (forward) and timed forward and
forward+backward (`scan.selective_scan_remat`, what training runs), median of 20. The last line
is the fastest setting by forward+backward as JSON (the `--config` of run_with_kernel_config.py).
"""

from __future__ import annotations

import argparse
import json
import runpy
import time

import jax
import jax.numpy as jnp

from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.models import scan_pallas
from vcmamba_jax.train.profiling import median_ms

# The inputs of scripts/benchmark_scan.py (a script, not a module: loaded by path).
scan_inputs = runpy.run_path('scripts/benchmark_scan.py')['scan_inputs']


SETTINGS = [
  {},  # the patch's default: group 4, blocks 64 / 32, 4 warps
  {'group': 1},
  {'group': 2},
  {'bwd_block': 16, 'group': 1},
  {'bwd_block': 16, 'group': 2},
  {'bwd_warps': 8, 'group': 1},
  {'fwd_block': 32},
  {'bwd_block': 64, 'bwd_warps': 8, 'group': 1},
  {'bwd_block': 16, 'bwd_warps': 2, 'group': 1},
  {'fwd_block': 128, 'fwd_warps': 8},
]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--inner', type=int, default=1024, help='E = 2 * C4 (B: 1024)')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  inputs = scan_inputs(jax.random.key(0), args.batch, 49, args.inner)
  ref = jax.jit(lambda *a: scan_lib.selective_scan(*a, impl='sequential'))(*inputs)
  ref32 = ref.astype(jnp.float32)
  print(jax.devices()[0].device_kind, flush=True)
  rows = []
  for setting in SETTINGS:
    scan_pallas.OVERRIDE = scan_pallas.KernelConfig(**setting)
    start = time.perf_counter()
    fwd = jax.jit(lambda *a: scan_lib.selective_scan_remat(*a, impl='fused'))
    grad = jax.jit(
      jax.grad(
        lambda *a: jnp.sum(scan_lib.selective_scan_remat(*a, impl='fused').astype(jnp.float32)),
        argnums=(0, 1, 2, 3, 4, 5),
      )
    )
    try:
      out = fwd(*inputs).astype(jnp.float32)
      row = {
        'setting': setting,
        'fwd_ms': round(median_ms(fwd, *inputs), 3),
        'fwd_bwd_ms': round(median_ms(grad, *inputs), 3),
        'rel_err': float(jnp.abs(out - ref32).max() / jnp.abs(ref32).max()),
        'seconds': round(time.perf_counter() - start, 1),
      }
    except Exception as e:  # a setting Triton refuses (registers, shared memory): report it
      row = {'setting': setting, 'error': str(e)[:300]}
    print(json.dumps(row), flush=True)
    rows.append(row)
  timed = [r for r in rows if 'fwd_bwd_ms' in r and r['rel_err'] < 2e-2]
  best = min(timed, key=lambda r: r['fwd_bwd_ms'])['setting'] if timed else None
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rows': rows, 'best': best}, f, indent=1)
  print(json.dumps(best))


if __name__ == '__main__':
  main()
