"""Times one FFN block (forward + backward, train mode) at each stage of B for other
formulations of the depthwise conv's VJP and of BatchNorm's statistics.

  python docs/pending/ffn_block_variants.py --batch 128 --json blocks.json     # on the GPU

Why: an H100 profile of B's train step (docs/benchmarks/h100_bf16_profile_b_train.json) puts
48% of the kernel time in reduction fusions. Per stage-1 block the taps kernel gradient
(9 sums of x-shifted * g) runs as 6 reduction kernels, 1.16 ms against ~0.12 ms of bytes, and the
taps forward fused into BatchNorm's mean takes 0.51 ms. Each variant replaces
`ops._depthwise_taps`'s VJP (and `ops._moments`) in this process only; the gradients are
compared with the first variant's (relative max error; bfloat16 noise is ~1e-2).

Variants (`dk` = how the kernel gradient is reduced):
- sep: the current code, one sum per tap (XLA merges siblings as it sees fit);
- stack: one reduction over a stacked [9, B, H, W, C] product (never materialised if XLA fuses);
- batch: per-image partial sums [9, B, C], then the batch;
- bar_dx: the input gradient materialised before BatchNorm's backward consumes it;
- bar_y: the forward output materialised before the statistics read it;
- impl pallas: `depthwise_impl='pallas'`, the conv's forward (with the moments mid_norm takes)
  and backward as Pallas kernels, at several launch configurations
  (`depthwise_pallas.LaunchConfig`; the fastest becomes its default).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax.models import depthwise_pallas, layers, ops

STAGES = [(64, 56), (128, 28), (320, 14), (512, 7)]  # (C, grid) of B at 224
FFN_BLOCKS = (4, 4, 12, 2)  # FFN blocks per stage of B (stage 4 ends in 4 Mamba layers)
VARIANTS = [
  {'dk': 'sep', 'bar_dx': False, 'bar_y': False},
  {'dk': 'stack', 'bar_dx': False, 'bar_y': False},
  {'dk': 'batch', 'bar_dx': False, 'bar_y': False},
  {'dk': 'sep', 'bar_dx': True, 'bar_y': False},
  {'dk': 'sep', 'bar_dx': False, 'bar_y': True},
  # The Pallas kernels (models/depthwise_pallas.py): the forward with the moments mid_norm takes,
  # the backward in one pass; at its default launch configuration, then others.
  {'dk': 'sep', 'bar_dx': False, 'bar_y': False, 'impl': 'pallas'},
  *(
    {'dk': 'sep', 'bar_dx': False, 'bar_y': False, 'impl': 'pallas', 'launch': launch}
    for launch in (
      # Session 26 (H100, B's 22 blocks): as they were (2048-element tiles, sums over W every row,
      # then W-padded copies) 61.0 ms; unpadded with per-row sums 58.4-61.8 ms (rows 8 / 4 / all,
      # 3 stages); tile sums (now the only code) with 1024-element tiles 52.5 ms, the default.
      # Launch settings around the default:
      {'rows': 8},
      {'rows': 4},
      {'num_warps': 8},
      {'tile_elements': 512},
      {'num_stages': 2},
      {'tile_elements': 2048},
    )
  ),
  # Main's own taps VJP (ops._depthwise_taps_fwd/_bwd: y and dx behind barriers).
  {'dk': 'sep', 'bar_dx': True, 'bar_y': True, 'main': True},
  # Session 27: norm1's backward sums in the conv's backward kernel (ops.FUSE_BN_BACKWARD), at
  # the default launch, then with 8 warps for the backward kernel (no spills), then main's
  # unfused path with 8 backward warps (does the warp count alone change anything?).
  {'dk': 'sep', 'bar_dx': False, 'bar_y': False, 'impl': 'pallas', 'fuse_bn': True},
  {
    'dk': 'sep',
    'bar_dx': False,
    'bar_y': False,
    'impl': 'pallas',
    'fuse_bn': True,
    'launch': {'bwd_num_warps': 8},
  },
  {'dk': 'sep', 'bar_dx': False, 'bar_y': False, 'impl': 'pallas', 'launch': {'bwd_num_warps': 8}},
  # Session 27: the kernels' multiply-adds as Triton's mul + add (before session 27).
  {'dk': 'sep', 'bar_dx': False, 'bar_y': False, 'impl': 'pallas', 'launch': {'fma': False}},
  # Session 27: BatchNorm's backward sums as a Pallas kernel (ops.PALLAS_BN_SUMS), alone and
  # with norm1's fused into the conv's backward (then only mid_norm's and norm2's are left).
  {'dk': 'sep', 'bar_dx': False, 'bar_y': False, 'impl': 'pallas', 'bn_sums': True},
  {
    'dk': 'sep',
    'bar_dx': False,
    'bar_y': False,
    'impl': 'pallas',
    'bn_sums': True,
    'fuse_bn': True,
  },
]


def _kernel_grad(dk: str, x: jax.Array, g: jax.Array, k: int) -> jax.Array:
  _, height, width, _ = x.shape
  pad = k // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  g32 = g.astype(jnp.float32)
  shifted = [
    ops._shifted(xp, di, dj, height, width).astype(jnp.float32)
    for di in range(k)
    for dj in range(k)
  ]
  if dk == 'sep':
    return jnp.stack([jnp.sum(s * g32, axis=(0, 1, 2)) for s in shifted])
  products = jnp.stack([s * g32 for s in shifted])
  if dk == 'stack':
    return jnp.sum(products, axis=(1, 2, 3))
  if dk == 'batch':
    return jnp.sum(jnp.sum(products, axis=(2, 3)), axis=1)
  raise ValueError(dk)


def use_variant(variant: dict) -> None:
  def fwd(x, kernel, bias):
    y = ops._taps_correlate(x, kernel, bias)
    if variant['bar_y']:
      y = jax.lax.optimization_barrier(y)
    return y, (x, kernel, bias)

  def bwd(residuals, g):
    x, kernel, bias = residuals
    x, g = jax.lax.optimization_barrier((x, g))
    dx = ops._taps_correlate(g.astype(x.dtype), kernel[::-1, ::-1])
    if variant['bar_dx']:
      dx = jax.lax.optimization_barrier(dx)
    dkernel = _kernel_grad(variant['dk'], x, g, kernel.shape[0])
    dbias = jnp.sum(g.astype(jnp.float32), axis=(0, 1, 2)).astype(bias.dtype)
    return dx, dkernel.reshape(kernel.shape).astype(kernel.dtype), dbias

  if variant.get('main'):
    ops._depthwise_taps.defvjp(ops._depthwise_taps_fwd, ops._depthwise_taps_bwd)
  else:
    ops._depthwise_taps.defvjp(fwd, bwd)
  launch = variant.get('launch')
  depthwise_pallas.OVERRIDE = depthwise_pallas.LaunchConfig(**launch) if launch else None
  ops.FUSE_BN_BACKWARD = variant.get('fuse_bn', False)
  ops.PALLAS_BN_SUMS = variant.get('bn_sums', False)


def time_block(width: int, grid: int, batch: int, impl: str, remat: str, repeats: int = 20):
  block = layers.FFNBlock(dtype=jnp.bfloat16, depthwise_impl=impl, remat_mlp=remat)
  x = jax.random.normal(jax.random.key(0), (batch, grid, grid, width), jnp.bfloat16)
  variables = block.init(jax.random.key(1), x[:2], train=True)

  def loss(params, x):
    y, updates = block.apply(
      {'params': params, 'batch_stats': variables['batch_stats']}, x, True, mutable=['batch_stats']
    )
    return jnp.sum(y.astype(jnp.float32) ** 2) * 1e-6, updates

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  start = time.perf_counter()
  grads, _ = jax.block_until_ready(step(variables['params'], x))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(variables['params'], x))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3, compile_s, jax.tree.leaves(grads)


def _rel_err(grads, ref) -> float:
  """Largest error of a leaf relative to that leaf's largest value, floored at 1e-3 of the
  tree's: the gradients of the biases in front of a BatchNorm are exactly 0 up to rounding, and
  their noise is not an error."""
  peaks = [float(jnp.max(jnp.abs(b.astype(jnp.float32)))) for b in ref]
  floor = 1e-3 * max(peaks)
  return max(
    float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) / max(peak, floor)
    for a, b, peak in zip(grads, ref, peaks)
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--json', default=None)
  parser.add_argument('--variants', default='', help='indices into VARIANTS, e.g. 0,5 (all)')
  parser.add_argument(
    '--remat_mlp', default='none', help="the blocks' remat_mlp (the model's default: fc2_input)"
  )
  args = parser.parse_args()
  chosen = [int(i) for i in args.variants.split(',') if i] or range(len(VARIANTS))
  print(jax.devices()[0].device_kind, 'batch', args.batch, flush=True)
  rows, refs = [], {}
  for variant in (VARIANTS[i] for i in chosen):
    use_variant(variant)
    row = {'variant': variant, 'ms': {}, 'rel_err': {}, 'compile_s': {}}
    for width, grid in STAGES:
      key = f'{grid}x{grid}x{width}'
      impl = variant.get('impl', 'taps')
      ms, compile_s, grads = time_block(width, grid, args.batch, impl, args.remat_mlp)
      refs.setdefault(key, grads)
      row['ms'][key] = round(ms, 3)
      row['rel_err'][key] = float(f'{_rel_err(grads, refs[key]):.2e}')
      row['compile_s'][key] = round(compile_s, 1)
    row['ffn_blocks_of_b_ms'] = round(
      sum(ms * n for ms, n in zip(row['ms'].values(), FFN_BLOCKS)), 2
    )
    print(json.dumps(row), flush=True)
    rows.append(row)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  main()
