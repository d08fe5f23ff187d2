r"""Checks every fast path against its reference on the current backend, and times both.

  python scripts/check_kernels.py --model vcmamba_b --batch 128      # on the GPU machine

Checked (fresh random inputs each, forward and gradients of every input, float32 and bfloat16):
- the fused selective scan (`scan_impl='fused'`, Pallas) against the sequential `lax.scan`
  reference, at the model's Mamba shapes (4 directions, L = 49, E = 2*C4, N = 16, delta and C
  shared by the directions as in the upstream model);
- `ops.depthwise_conv(impl='taps')` and `impl='pallas'` (the Pallas kernels) against
  `lax.conv` (cuDNN) at the model's depthwise shapes (the mixer's 7x7 and the Mlp's 3x3 of
  every stage);
- `ops.batch_norm_train` (hand-written VJP, fused GELU) against autodiff of the plain formula,
  alone and fed the Pallas conv's moments (the Mlp's mid conv + mid_norm with impl 'pallas');
- `ops.bn_gelu_depthwise_train` with `ops.FUSE_BN_BACKWARD` (norm1's backward sums in the
  conv's backward kernel) against autodiff of fc1's bias + BatchNorm + GELU, then `lax.conv`,
  and BatchNorm with `ops.PALLAS_BN_SUMS` (its backward sums as a Pallas kernel);
- the train state's init drawn with JAX's threefry GPU kernel (as `init_sharded` does on GPUs)
  against XLA's threefry: bitwise equal.
Error = max |fast - ref| / max |ref| per output; bounds: 1e-5 (float32; 5e-3 with TF32 matmuls
on GPUs), 2e-2 (bfloat16 inputs). Checks run at a small batch (`--check_batch`); then prints forward and forward+backward
milliseconds of each fast path and its reference at `--batch` in bfloat16 (median of
`--repeats`). Exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import vcmamba_jax
from vcmamba_jax.models import depthwise_pallas, ops, scan_pallas
from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.train import state as state_lib
from vcmamba_jax.train.profiling import median_ms

FAILED: list[str] = []


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  if not np.all(np.isfinite(a)):
    return float('inf')
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _compare(name: str, fast, ref, bound: float) -> None:
  fast, ref = jax.tree.leaves(fast), jax.tree.leaves(ref)
  errs = [_rel(f, r) for f, r in zip(fast, ref)]
  ok = max(errs) <= bound
  if not ok:
    FAILED.append(name)
  print(f'{"ok  " if ok else "FAIL"} {name:<58} max rel err {max(errs):.2e} (bound {bound:.0e})')


def _grad_of(fn, argnums, shape):
  weight = jax.random.normal(jax.random.key(99), shape, jnp.float32)
  return jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * weight), argnums=argnums))


def check(name, fast_fn, ref_fn, args, bound, argnums):
  """Forward and gradients (of sum(out * w), w random) of fast vs ref."""
  out_f, out_r = jax.jit(fast_fn)(*args), jax.jit(ref_fn)(*args)
  _compare(f'{name} forward', out_f, out_r, bound)
  shape = jnp.shape(out_r)
  grads_f = _grad_of(fast_fn, argnums, shape)(*args)
  _compare(f'{name} gradients', grads_f, _grad_of(ref_fn, argnums, shape)(*args), bound)


def timing(fast_fn, ref_fn, args, repeats, argnums):
  """Median ms of forward and forward+backward of both."""
  shape = jax.eval_shape(fast_fn, *args).shape
  grad_f, grad_r = _grad_of(fast_fn, argnums, shape), _grad_of(ref_fn, argnums, shape)
  return {
    'fast_fwd_ms': median_ms(jax.jit(fast_fn), *args, repeats=repeats),
    'fast_fwd_bwd_ms': median_ms(grad_f, *args, repeats=repeats),
    'ref_fwd_ms': median_ms(jax.jit(ref_fn), *args, repeats=repeats),
    'ref_fwd_bwd_ms': median_ms(grad_r, *args, repeats=repeats),
  }


def scan_inputs(key, batch, length, inner, dtype, state=16):
  ks = jax.random.split(key, 7)
  u = jax.random.normal(ks[0], (batch, 4, length, inner), dtype)
  delta = (jax.random.normal(ks[1], (batch, 1, length, inner)) * 0.5 - 1.0).astype(dtype)
  A = -jnp.exp(jax.random.normal(ks[2], (inner, state)) * 0.5)
  B = jax.random.normal(ks[3], (batch, 4, length, state))
  C = jax.random.normal(ks[4], (batch, 1, length, state)).astype(dtype)
  D = jax.random.normal(ks[5], (inner,))
  bias = jax.random.normal(ks[6], (inner,)) * 0.1
  return u, delta, A, B, C, D, bias


def cases(model: str, batch: int, length: int, dtype, seed: int):
  """(name, fast, ref, args, argnums) of every fast path at the model's shapes."""
  widths = vcmamba_jax.create_model(model).widths
  inner = 2 * widths[-1]
  gpu = jax.default_backend() == 'gpu'
  out = []
  inputs = scan_inputs(jax.random.key(seed), batch, length, inner, dtype)
  out.append(
    (
      'scan fused vs sequential',
      lambda *a: scan_pallas.selective_scan_fused(*a, interpret=not gpu),
      lambda *a: scan_lib.selective_scan(*a, impl='sequential'),
      inputs,
      tuple(range(7)),
    )
  )

  # The depthwise convs: the mixer's 7x7 and the Mlp's 3x3 on every stage's grid. The reference
  # runs in float32 on the same (rounded) inputs: autodiff of cuDNN's conv in bfloat16 sums the
  # bias gradient in bfloat16 (2-8% off at these shapes).
  def ref_depthwise(x, w, b):
    return ops.depthwise_conv(x.astype(jnp.float32), w, b, impl='xla').astype(x.dtype)

  shapes = [(7, 7, inner)] + [(3, 56 // 2**s, 4 * c) for s, c in enumerate(widths)]
  for i, (k, grid, channels) in enumerate(shapes):
    key_x, key_w, key_b = jax.random.split(jax.random.key(seed * 100 + i), 3)
    x = jax.random.normal(key_x, (batch, grid, grid, channels), dtype)
    w = jax.random.normal(key_w, (k, k, 1, channels)) * 0.2
    b = jax.random.normal(key_b, (channels,))
    for impl in ('taps', 'pallas'):
      out.append(
        (
          f'depthwise {k}x{k} {impl} vs lax.conv {grid}x{grid}x{channels}',
          lambda x, w, b, impl=impl: ops.depthwise_conv(x, w, b, impl=impl),
          ref_depthwise,
          (x, w, b),
          (0, 1, 2),
        )
      )
  # Inference: the Mlp's 3x3 conv with mid_norm (running statistics) and GELU in one kernel,
  # against the conv in float32 then the same BatchNorm and GELU, on every stage's grid.
  for i, (_, grid, channels) in enumerate(shapes[1:]):
    keys = jax.random.split(jax.random.key(seed * 10 + i), 5)
    x = jax.random.normal(keys[0], (batch, grid, grid, channels), dtype)
    w = jax.random.normal(keys[1], (3, 3, 1, channels)) * 0.2
    b = jax.random.normal(keys[2], (channels,))
    affine = (
      jax.random.normal(keys[3], (channels,)) * 0.3,
      1 + 0.2 * jax.random.normal(keys[4], (channels,)),
      0.1 * jax.random.normal(keys[2], (channels,)),
    )
    out.append(
      (
        f'depthwise 3x3 + mid_norm + gelu (eval) pallas vs lax.conv {grid}x{grid}x{channels}',
        lambda x, w, b, affine=affine: ops.depthwise_conv_bn_gelu(x, w, b, affine, impl='pallas'),
        lambda x, w, b, affine=affine: ops.batch_norm_eval(ref_depthwise(x, w, b), *affine, 'gelu'),
        (x, w, b),
        (0, 1, 2),
      )
    )
  kx, ks, kb = jax.random.split(jax.random.key(seed * 1000), 3)
  channels = 4 * widths[0]
  x = (jax.random.normal(kx, (batch, 56, 56, channels)) * 2 + 0.5).astype(dtype)
  scale = 1 + 0.1 * jax.random.normal(ks, (channels,))
  shift = 0.1 * jax.random.normal(kb, (channels,))

  def bn_plain(x, scale, shift):
    xf = x.astype(jnp.float32)
    mean = xf.mean((0, 1, 2))
    var = jnp.square(xf - mean).mean((0, 1, 2))
    y = (xf - mean) * (scale * jax.lax.rsqrt(var + 1e-5)) + shift
    return jax.nn.gelu(y, approximate=False).astype(x.dtype)

  out.append(
    (
      f'batch_norm_train+gelu vs autodiff 56x56x{channels}',
      lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-5, 'gelu')[0],
      bn_plain,
      (x, scale, shift),
      (0, 1, 2),
    )
  )

  def bn_pallas_sums(x, scale, shift):  # ops.PALLAS_BN_SUMS: the backward sums as a kernel
    previous, ops.PALLAS_BN_SUMS = ops.PALLAS_BN_SUMS, True
    try:
      return ops.batch_norm_train(x, scale, shift, 1e-5, 'gelu')[0]
    finally:
      ops.PALLAS_BN_SUMS = previous

  out.append(
    (
      f'batch_norm_train+gelu, Pallas backward sums vs autodiff 56x56x{channels}',
      bn_pallas_sums,
      bn_plain,
      (x, scale, shift),
      (0, 1, 2),
    )
  )
  # The Mlp's mid conv + mid_norm with impl 'pallas': the conv's moments replace BatchNorm's.
  w = jax.random.normal(kb, (3, 3, 1, channels)) * 0.2

  def conv_bn_pallas(x, w, b, s):
    y, moments = ops.depthwise_conv_with_moments(x, w, b, impl='pallas')
    return ops.batch_norm_train(y, s, 0.1 * b, 1e-5, 'gelu', moments)[0]

  out.append(
    (
      f'depthwise 3x3 pallas + its moments -> batch_norm+gelu vs lax.conv 56x56x{channels}',
      conv_bn_pallas,
      lambda x, w, b, s: bn_plain(ref_depthwise(x, w, b), s, 0.1 * b),
      (x, w, shift, scale),
      (0, 1, 3),  # not the conv's bias: it feeds the BatchNorm, its exact gradient is 0
    )
  )

  # The Mlp's fc1 bias + norm1 + GELU -> mid conv with `ops.FUSE_BN_BACKWARD`: norm1's backward
  # sums from the conv's backward kernel, on every stage's grid.
  def fused_bn_conv(z, s, w, zb, b):
    previous, ops.FUSE_BN_BACKWARD = ops.FUSE_BN_BACKWARD, True
    try:
      moments = ops.batch_moments(z + zb.astype(z.dtype))
      bn = ops.TrainBatchNorm(s, 0.1 * b, moments, 1e-5, 'gelu', input_bias=zb)
      return ops.bn_gelu_depthwise_train(z, bn, w, b, impl='pallas')[0]
    finally:
      ops.FUSE_BN_BACKWARD = previous

  def unfused_bn_conv(z, s, w, zb, b):
    return ref_depthwise(bn_plain(z + zb.astype(z.dtype), s, 0.1 * b), w, b)

  for i, (_, grid, channels) in enumerate(shapes[1:]):
    keys = jax.random.split(jax.random.key(seed * 10_000 + i), 5)
    z = (jax.random.normal(keys[0], (batch, grid, grid, channels)) * 2 + 0.5).astype(dtype)
    s = 1 + 0.1 * jax.random.normal(keys[1], (channels,))
    w = jax.random.normal(keys[2], (3, 3, 1, channels)) * 0.2
    zb = 0.3 * jax.random.normal(keys[3], (channels,))
    b = jax.random.normal(keys[4], (channels,))
    out.append(
      (
        f'bias+norm1+gelu -> depthwise 3x3 pallas, fused bn backward vs lax.conv '
        f'{grid}x{grid}x{channels}',
        fused_bn_conv,
        unfused_bn_conv,
        (z, s, w, zb, b),
        (0, 1, 2, 4),  # not fc1's bias: it feeds the BatchNorm, its exact gradient is 0
      )
    )
  return out


def check_threefry_init(name: str) -> None:
  """The train state's init values do not depend on how threefry is lowered: `init_sharded`
  draws them with the GPU kernel (`state.threefry_kernels`), XLA's expanded threefry elsewhere."""
  model = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64)
  init = state_lib.make_initializer(model, optax.adamw(1e-3), image_size=64, use_ema=True)
  rng = jax.random.PRNGKey(0)
  plain = jax.jit(init)(rng)
  with state_lib.threefry_kernels():
    kernels = jax.jit(init)(rng)
  differ = [
    jax.tree_util.keystr(path)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(plain), jax.tree.leaves(kernels))
    if not np.array_equal(np.asarray(a), np.asarray(b))
  ]
  if differ:
    FAILED.append(name)
  print(f'{"FAIL" if differ else "ok  "} {name}' + (f': {differ[:3]} differ' if differ else ''))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--model', default='vcmamba_b')
  parser.add_argument('--batch', type=int, default=128, help='batch of the timings')
  parser.add_argument('--check_batch', type=int, default=4, help='batch of the checks')
  parser.add_argument('--length', type=int, default=49)
  parser.add_argument('--repeats', type=int, default=20)
  parser.add_argument('--skip_timing', action='store_true')
  parser.add_argument(
    '--only', default='', help='run the cases whose name contains this (or any of several, a,b)'
  )
  args = parser.parse_args()
  wanted = lambda name: any(part in name for part in args.only.split(','))
  print(f'device: {jax.devices()[0].device_kind}, jax {jax.__version__}', flush=True)
  gpu = jax.default_backend() == 'gpu'
  if gpu:  # a kernel that falls back would compare the fallback with the reference and pass
    for name, ok in [
      ('Pallas depthwise kernels available', depthwise_pallas.available()),
      ('fused Pallas scan available', scan_pallas.fused_backend_available()),
    ]:
      print(f'{"ok  " if ok else "FAIL"} {name}')
      if not ok:
        FAILED.append(name)
  for seed, (dtype, bound) in enumerate(((jnp.float32, 1e-4), (jnp.bfloat16, 2e-2)), start=1):
    for name, fast, ref, fn_args, argnums in cases(
      args.model, args.check_batch, args.length, dtype, seed
    ):
      if not wanted(name):
        continue
      # XLA's GPU convolutions and matmuls run float32 as TF32 by default.
      tol = 5e-3 if gpu and dtype == jnp.float32 and 'lax.conv' in name else bound
      check(f'{name}, {jnp.dtype(dtype).name}', fast, ref, fn_args, tol, argnums)
  name = 'init with threefry GPU kernels vs XLA threefry (vcmamba_nano), bitwise'
  if wanted(name):
    check_threefry_init(name)
  rows = {}
  if not args.skip_timing:
    for name, fast, ref, fn_args, argnums in cases(
      args.model, args.batch, args.length, jnp.bfloat16, 7
    ):
      if not wanted(name):
        continue
      rows[name] = timing(fast, ref, fn_args, args.repeats, argnums)
      r = rows[name]
      print(
        f'time {name:<46} fast {r["fast_fwd_ms"]:.3f} / {r["fast_fwd_bwd_ms"]:.3f} ms, '
        f'ref {r["ref_fwd_ms"]:.3f} / {r["ref_fwd_bwd_ms"]:.3f} ms (fwd / fwd+bwd)',
        flush=True,
      )
  if FAILED:
    print(f'{len(FAILED)} check(s) FAILED: {FAILED}')
    return 1
  print('all checks passed')
  return 0


if __name__ == '__main__':
  sys.exit(main())
