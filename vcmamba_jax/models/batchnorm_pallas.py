"""Train-mode BatchNorm's backward sums as one Pallas/Triton kernel (GPUs; opt-in,
`ops.PALLAS_BN_SUMS`).

Why: BatchNorm's backward needs two sums over pixels per channel, of dz = dy * act'(z) and of
dz * xhat, before the elementwise dx pass can run. XLA runs them as a column reduction over
[pixels, C], which an H100 profile of B's train step (2026-12-06, taps era,
docs/benchmarks/h100_bf16_profile_b_train.json) timed at ~1.15 TB/s for mid_norm's (0.36 ms for
410 MB at stage 1). This kernel walks a slab of rows per program in [rows, blk] tiles, with the
sums kept as tiles and reduced once at its end, as the depthwise kernels do. Not yet timed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax import sharding
from vcmamba_jax.models import depthwise_pallas, pallas_gpu

TILE_ELEMENTS = 2048  # a program's [rows, blk] tile
PROGRAMS = 2048  # programs to aim for (row slabs x channel blocks)


def _block(channels: int) -> int:
  """Channels per program: the largest power of two dividing C, at most 64."""
  return min(channels & -channels, 64)


def _kernel(x_ref, g_ref, p_ref, out_ref, *, total, tile_rows, tiles, activation, fma):
  """x_ref, g_ref [M, blk]: BatchNorm's input and its output's gradient; p_ref [4, blk]: mean,
  rstd, scale, bias -> out_ref [2, blk]: this program's sums of dz and dz * xhat over its
  `tiles` tiles of `tile_rows` rows (rows >= `total` masked)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  f32 = jnp.float32
  mean, rstd, scale, shift = (p_ref[i, :][None, :] for i in range(4))
  offsets = jax.lax.broadcasted_iota(jnp.int32, (tile_rows, 1), 0)
  first = pl.program_id(0) * tiles * tile_rows

  def body(i, acc):
    start = first + i * tile_rows
    mask = start + offsets < total
    x = plgpu.load(x_ref.at[pl.ds(start, tile_rows), :], mask=mask, other=0).astype(f32)
    g = plgpu.load(g_ref.at[pl.ds(start, tile_rows), :], mask=mask, other=0).astype(f32)
    xhat = (x - mean) * rstd
    z = pallas_gpu.fma(xhat, scale, shift, fma)
    if activation == 'gelu':
      g = g * depthwise_pallas.gelu_grad_in_kernel(z, fma)
    elif activation == 'relu':
      g = jnp.where(z > 0, g, 0.0)
    # Masked rows: g is 0 there, and so is every product with it.
    return acc[0] + g, pallas_gpu.fma(g, xhat, acc[1], fma)

  zeros = jnp.zeros((tile_rows, mean.shape[-1]), f32)
  sum_dz, sum_dz_xhat = jax.lax.fori_loop(0, tiles, body, (zeros, zeros))
  out_ref[0, :] = jnp.sum(sum_dz, axis=0)
  out_ref[1, :] = jnp.sum(sum_dz_xhat, axis=0)


def backward_sums(
  x: jax.Array,
  dy: jax.Array,
  mean: jax.Array,
  rstd: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  activation: str,
  *,
  interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
  """(sum of dz, sum of dz * xhat) over all axes but the last, float32, where xhat = (x -
  mean) * rstd and dz = dy * act'(xhat * scale + bias): what `ops._bn_backward` sums.

  Args:
    x, dy: [B, ..., C], the same shape (any float dtype; float32 math).
    mean, rstd, scale, bias: [C] float32.
    activation: 'none' | 'relu' | 'gelu'.
    interpret: run in the Pallas interpreter (any backend; for tests).
  """
  from jax.experimental import pallas as pl

  channels = x.shape[-1]
  block = _block(channels)
  params = jnp.stack([mean, rstd, scale, bias]).astype(jnp.float32)

  def call(x, dy, params):  # on each device's images under a mesh (sharding.per_device)
    rows = int(np.prod(x.shape[:-1]))
    x, dy = x.reshape(rows, channels), dy.reshape(rows, channels)
    tile_rows = max(1, TILE_ELEMENTS // block)
    tile_count = -(-rows // tile_rows)
    slabs = max(1, min(tile_count, PROGRAMS // (channels // block)))
    tiles = -(-tile_count // slabs)
    slabs = -(-tile_count // tiles)
    if interpret:  # the interpreter clamps an out-of-bounds slice instead of masking it
      pad = slabs * tiles * tile_rows - rows
      x, dy = (jnp.pad(a, ((0, pad), (0, 0))) for a in (x, dy))
    kernel = functools.partial(
      _kernel,
      total=rows,
      tile_rows=tile_rows,
      tiles=tiles,
      activation=activation,
      fma=not interpret,
    )
    column = pl.BlockSpec((x.shape[0], block), lambda s, c: (0, c))
    sums = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((slabs, 2, channels), jnp.float32),
      grid=(slabs, channels // block),
      in_specs=[column, column, pl.BlockSpec((4, block), lambda s, c: (0, c))],
      out_specs=pl.BlockSpec((None, 2, block), lambda s, c: (s, 0, c)),
      compiler_params=None if interpret else pallas_gpu.compiler_params(4),
      interpret=interpret,
    )(x, dy, params)
    return sums.sum(axis=0)[None]  # [1, 2, C]: this device's share

  sums = sharding.per_device(call, x, dy.astype(x.dtype), params, batched=(True, True, False))
  total = sums.sum(axis=0)
  return total[0], total[1]


@functools.cache
def available() -> bool:
  """Whether the kernel compiles and runs on the default backend (a GPU); False, with one
  logged line, elsewhere or if Pallas's Triton backend fails (BatchNorm then sums with XLA)."""
  if jax.default_backend() != 'gpu':
    return False

  def run():
    x = np.ones((2, 4, 4, 16), np.float32)
    v = x[0, 0, 0]
    fn = functools.partial(backward_sums, activation='gelu')
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, x, v, v, v, v)]
    jax.block_until_ready(jax.jit(fn).lower(*specs).compile()(x, x, v, v, v, v))

  return pallas_gpu.probe(run, 'Pallas BatchNorm backward sums', "XLA's reduction")
