"""Times the selective-scan implementations and the model's forward/backward on one device.

Every implementation is first checked against the sequential reference on the same inputs.

  python scripts/benchmark_scan.py --batch 128 --model vcmamba_b --dtype bfloat16

Prints a table of median milliseconds (forward, forward+backward) per implementation at the shapes
of the model's Mamba layers (L = 49 tokens at 224 px, E = 2*C4, N = 16, 4 directions), and model
eval/train img/s with synthetic data.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vcmamba_jax
from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.train.profiling import median_ms


def scan_inputs(key, batch, length, inner, state=16):
  ks = jax.random.split(key, 6)
  u = jax.random.normal(ks[0], (batch, 4, length, inner), jnp.bfloat16)
  delta = jax.random.normal(ks[1], (batch, 1, length, inner), jnp.bfloat16) * 0.5
  A = -jnp.exp(jax.random.normal(ks[2], (inner, state)) * 0.5)
  B = jax.random.normal(ks[3], (batch, 4, length, state))
  C = jax.random.normal(ks[4], (batch, 1, length, state), jnp.bfloat16)
  D = jnp.ones((inner,))
  bias = jax.random.normal(ks[5], (inner,)) * 0.1
  return u, delta, A, B, C, D, bias


def bench_scans(args) -> list[dict]:
  inner = 2 * vcmamba_jax.create_model(args.model).widths[-1]
  inputs = scan_inputs(jax.random.key(0), args.batch, args.length, inner)
  ref = jax.jit(lambda *a: scan_lib.selective_scan(*a, impl='sequential'))(*inputs)
  rows = []
  from vcmamba_jax.models import scan_pallas

  impls = list(args.impls)
  for blocks in args.fused_blocks:  # extra fused variants with other launch settings
    impls.append(f'fused:{blocks}')
  names = ('FWD_BLOCK', 'BWD_BLOCK', 'NUM_STAGES', 'FWD_WARPS', 'BWD_WARPS', 'USE_FMA')
  defaults = {name: getattr(scan_pallas, name) for name in names}
  for impl in impls:
    for name, value in defaults.items():
      setattr(scan_pallas, name, value)
    if impl.startswith('fused:'):
      values = [int(b) for b in impl.split(':')[1].split(',')]
      for name, value in zip(names, values):
        setattr(scan_pallas, name, value)
      impl_name, impl = impl, 'fused'
    else:
      impl_name = impl
    fwd = jax.jit(lambda *a, impl=impl: scan_lib.selective_scan_remat(*a, impl=impl))
    out = fwd(*inputs)
    err = float(
      jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()
      / jnp.abs(ref.astype(jnp.float32)).max()
    )
    grad = jax.jit(
      jax.grad(
        lambda *a, impl=impl: jnp.sum(
          scan_lib.selective_scan_remat(*a, impl=impl).astype(jnp.float32)
        ),
        argnums=(0, 1, 2, 3, 4, 5),
      )
    )
    rows.append(
      {
        'impl': impl_name,
        'fwd_ms': median_ms(fwd, *inputs),
        'fwd_bwd_ms': median_ms(grad, *inputs),
        'rel_err_vs_sequential': err,
      }
    )
  return rows


def bench_model(args) -> dict:
  dtype = jnp.dtype(args.dtype)
  model = vcmamba_jax.create_model(
    args.model, dtype=dtype, scan_impl=args.model_impl, drop_path_rate=0.1
  )
  size = args.img_size
  variables = jax.jit(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, size, size, 3)))
  )()
  results = {}
  x_eval = jax.random.normal(jax.random.key(1), (args.eval_batch, size, size, 3))
  infer = jax.jit(lambda v, x: model.apply(v, x)[0])
  ms = median_ms(infer, variables, x_eval)
  results['eval_img_s'] = args.eval_batch / ms * 1e3
  results['eval_step_ms'] = ms

  tx = optax.adamw(1e-3, weight_decay=0.05)
  opt_state = tx.init(variables['params'])
  x = jax.random.normal(jax.random.key(2), (args.batch, size, size, 3))
  labels = jax.random.randint(jax.random.key(3), (args.batch,), 0, 1000)

  def train_step(params, batch_stats, opt_state, x, labels, key):
    def loss_fn(p):
      (_, out), upd = model.apply(
        {'params': p, 'batch_stats': batch_stats},
        x,
        train=True,
        mutable=['batch_stats'],
        rngs={'drop_path': key},
      )
      ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
      return 0.5 * ce(out['logits_head']) + 0.5 * ce(out['logits_dist']), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd['batch_stats'], opt_state, loss

  step = jax.jit(train_step, donate_argnums=(0, 1, 2))
  compiled = step.lower(
    variables['params'], variables['batch_stats'], opt_state, x, labels, jax.random.key(4)
  ).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  state = (variables['params'], variables['batch_stats'], opt_state)
  for _ in range(3):
    *state, loss = compiled(*state, x, labels, jax.random.key(4))
  jax.block_until_ready(loss)
  times = []
  for i in range(args.steps):
    start = time.perf_counter()
    *state, loss = compiled(*state, x, labels, jax.random.key(i))
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  ms = float(np.median(times)) * 1e3
  results.update(
    train_img_s=args.batch / ms * 1e3,
    train_step_ms=ms,
    train_step_tflops=flops / 1e12,
    achieved_tflop_s=flops / ms / 1e9,
  )
  stats = jax.devices()[0].memory_stats() or {}
  results['peak_memory_gib'] = stats.get('peak_bytes_in_use', 0) / 2**30
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='vcmamba_b')
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--eval_batch', type=int, default=256)
  parser.add_argument('--img_size', type=int, default=224)
  parser.add_argument('--length', type=int, default=49)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--impls', nargs='+', default=['associative', 'sequential', 'fused'])
  parser.add_argument('--model_impl', default='auto')
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument(
    '--fused_blocks',
    nargs='*',
    default=[],
    help='extra fused-kernel launch settings to time: fwd_block,bwd_block[,num_stages[,fwd_warps'
    '[,bwd_warps[,use_fma]]]], e.g. 32,16 64,32,3 32,16,1,1,1 32,16,3,1,1,0',
  )
  parser.add_argument('--skip_model', action='store_true')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}')
  report = {'scan': bench_scans(args)}
  for row in report['scan']:
    print(
      f'scan {row["impl"]:>14}: fwd {row["fwd_ms"]:7.2f} ms  fwd+bwd '
      f'{row["fwd_bwd_ms"]:7.2f} ms  rel err {row["rel_err_vs_sequential"]:.1e}'
    )
  if not args.skip_model:
    report['model'] = bench_model(args)
    print(json.dumps(report['model'], indent=1))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  main()
