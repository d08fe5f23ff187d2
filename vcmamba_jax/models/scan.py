"""Selective scan (Mamba-1 semantics) and the zig-zag scan tables of PlainMamba/VCMamba.

Everything here is a pure function. Layout is channel-last: tokens on axis -2, channels on axis -1,
any leading axes (batch, scan direction) broadcast.

Semantics (mamba_ssm ``selective_scan_fn`` with ``z=None``, ``delta_softplus=True``):

    delta[t, e] = softplus(delta_raw[t, e] + delta_bias[e])
    h[t, e, n]  = exp(delta[t, e] * A[e, n]) * h[t-1, e, n] + delta[t, e] * B[t, n] * u[t, e]
    y[t, e]     = sum_n h[t, e, n] * C[t, n] + D[e] * u[t, e]

with h[-1] = 0. All arithmetic is float32 whatever the input dtype; the output has ``u``'s dtype.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax.models import scan_pallas, scan_tpu

ScanImpl = Literal['auto', 'associative', 'sequential', 'chunked', 'fused', 'pallas_tpu']
SCAN_IMPLS = ('auto', 'associative', 'sequential', 'chunked', 'fused', 'pallas_tpu')
CHUNK_TOKENS = 8  # tokens per rematerialised chunk of impl='chunked'

# Direction codes of the zig-zag scans: the move that arrives at a token.
DIR_START, DIR_RIGHT, DIR_LEFT, DIR_UP, DIR_DOWN = 0, 1, 2, 3, 4
NUM_DIRECTION_CODES = 5


# ---------------------------------------------------------------------------------------------
# Scan tables
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def scan_tables(height: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Orders, inverse orders and direction codes of the four zig-zag scans of an HxW grid.

  Token index p = i * width + j (row-major, as a NHWC -> [B, H*W, C] reshape gives).

  Returns:
    orders: int32 [4, L]; orders[k, t] = raster index of the token visited at step t of scan k.
      k = 0: row snake (even rows left->right, odd rows right->left); k = 1: reversed row snake;
      k = 2: column snake (even columns top->bottom, odd columns bottom->top); k = 3: its reverse.
    inverse: int32 [4, L]; inverse[k, orders[k, t]] = t.
    codes: int32 [4, L]; codes[k, 0] = 0 (start), codes[k, t] = code of the move from
      orders[k, t-1] to orders[k, t]: 1 right (j+1), 2 left (j-1), 3 up (i-1), 4 down (i+1).
  Cached per (height, width); the arrays are read-only.
  """
  if height < 1 or width < 1:
    raise ValueError(f'scan grid must be at least 1x1, got {height}x{width}')
  rows = []
  for i in range(height):
    cols = range(width) if i % 2 == 0 else range(width - 1, -1, -1)
    rows.extend(i * width + j for j in cols)
  row_snake = np.asarray(rows, dtype=np.int32)
  cols = []
  for j in range(width):
    ii = range(height) if j % 2 == 0 else range(height - 1, -1, -1)
    cols.extend(i * width + j for i in ii)
  col_snake = np.asarray(cols, dtype=np.int32)
  orders = np.stack([row_snake, row_snake[::-1], col_snake, col_snake[::-1]])

  num_tokens = height * width
  inverse = np.empty_like(orders)
  codes = np.zeros_like(orders)
  for k in range(4):
    inverse[k, orders[k]] = np.arange(num_tokens, dtype=np.int32)
    di = np.diff(orders[k] // width)
    dj = np.diff(orders[k] % width)
    step = np.select(
      [dj == 1, dj == -1, di == -1, di == 1],
      [DIR_RIGHT, DIR_LEFT, DIR_UP, DIR_DOWN],
      default=-1,
    )
    if np.any(step < 0):  # pragma: no cover - a snake only makes unit moves
      raise AssertionError('non-adjacent move in zig-zag scan')
    codes[k, 1:] = step
  for table in (orders, inverse, codes):
    table.setflags(write=False)
  return orders, inverse, codes


def _snake(x: jax.Array) -> jax.Array:
  """[B, R, S, E] -> [B, R*S, E], odd rows reversed (a row snake over axis 1)."""
  odd = (np.arange(x.shape[1]) % 2 == 1)[None, :, None, None]
  return jnp.where(odd, x[:, :, ::-1], x).reshape(x.shape[0], -1, x.shape[-1])


def zigzag_sequences(x: jax.Array) -> jax.Array:
  """[B, H, W, E] -> [B, 4, H*W, E]: the tokens in the four scan orders of ``scan_tables``.

  Same values as ``jnp.take(x.reshape(B, H*W, E), orders, axis=1)``, written with reversals and
  a transpose instead of a gather, so that XLA fuses it into one pass and its transpose (the
  backward pass) is the same kind of pass rather than a scatter-add.
  """
  row = _snake(x)
  col = _snake(jnp.swapaxes(x, 1, 2))
  return jnp.stack([row, row[:, ::-1], col, col[:, ::-1]], axis=1)


def _unsnake(y: jax.Array, rows: int, cols: int) -> jax.Array:
  """[B, R*S, E] in row-snake order -> [B, R, S, E]."""
  y = y.reshape(y.shape[0], rows, cols, y.shape[-1])
  odd = (np.arange(rows) % 2 == 1)[None, :, None, None]
  return jnp.where(odd, y[:, :, ::-1], y)


def zigzag_merge(y: jax.Array, height: int, width: int, materialize: bool = False) -> jax.Array:
  """[B, 4, H*W, E] outputs in scan order -> [B, H, W, E] float32, summed over the directions.

  The inverse of ``zigzag_sequences`` followed by the sum over the four scans (in order 0..3,
  float32), as the upstream model merges them. `materialize` (the mixer sets it in inference):
  the sum is written once behind a barrier; without it XLA's inference program wrote the four
  un-permuted directions as four float32 tensors for the LayerNorm to sum (deviceless for an
  H100, B's eval step at batch 256: 48.6 -> 47.0 GB moved). In training XLA already writes the
  sum once, and the barrier only moved other fusions (+0.3 GB).
  """
  f32 = jnp.float32
  y = y.astype(f32)
  r0 = _unsnake(y[:, 0], height, width)
  r1 = _unsnake(y[:, 1, ::-1], height, width)
  r2 = jnp.swapaxes(_unsnake(y[:, 2], width, height), 1, 2)
  r3 = jnp.swapaxes(_unsnake(y[:, 3, ::-1], width, height), 1, 2)
  merged = ((r0 + r1) + r2) + r3
  return jax.lax.optimization_barrier(merged) if materialize else merged


# ---------------------------------------------------------------------------------------------
# Selective scan
# ---------------------------------------------------------------------------------------------
def softplus(x: jax.Array) -> jax.Array:
  """PyTorch/CUDA-kernel softplus: log1p(exp(x)), and x itself for x > 20."""
  return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def _combine(left, right):
  a_left, b_left = left
  a_right, b_right = right
  return a_left * a_right, a_right * b_left + b_right


def _linear_recurrence_associative(decay: jax.Array, drive: jax.Array, axis: int) -> jax.Array:
  """h[t] = decay[t] * h[t-1] + drive[t] (h[-1] = 0) along ``axis`` by a parallel prefix scan.

  ``decay`` may have size 1 on broadcast axes where ``drive`` does not (e.g. shared across scan
  directions); it is never materialised at the broadcast size.
  """
  _, states = jax.lax.associative_scan(_combine, (decay, drive), axis=axis)
  return states


def _linear_recurrence_sequential(decay: jax.Array, drive: jax.Array, axis: int) -> jax.Array:
  """Reference: the same recurrence as a sequential ``lax.scan``."""
  decay = jnp.moveaxis(jnp.broadcast_to(decay, drive.shape), axis, 0)
  drive = jnp.moveaxis(drive, axis, 0)

  def step(state, inputs):
    a_t, b_t = inputs
    state = a_t * state + b_t
    return state, state

  _, states = jax.lax.scan(step, jnp.zeros_like(drive[0]), (decay, drive))
  return jnp.moveaxis(states, 0, axis)


_RECURRENCES = {
  'associative': _linear_recurrence_associative,
  'sequential': _linear_recurrence_sequential,
}


def resolve_auto(length: int, inner: int, delta_softplus: bool = True, platform: str | None = None):
  """What impl='auto' runs on `platform` (default: JAX's default backend): 'fused' on GPUs for
  short sequences, 'pallas_tpu' on TPUs, else 'associative'."""
  platform = platform or jax.default_backend()
  if not delta_softplus:
    return 'associative'
  if platform == 'tpu':
    return 'pallas_tpu'
  if scan_pallas.fused_scan_supported(length, inner):
    return 'fused'
  return 'associative'


def _selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus):
  """The scan as a ``lax.scan`` over chunks of CHUNK_TOKENS tokens, each chunk under
  ``jax.checkpoint``: peak memory is the chunk-boundary states [L / chunk, ..., E, N] plus one
  chunk's [chunk, ..., E, N] instead of [..., L, E, N] (the non-Pallas fallback on TPU)."""
  f32 = jnp.float32
  out_dtype = u.dtype
  length = u.shape[-2]
  rank = max(x.ndim for x in (u, delta, B, C))
  u, delta, B, C = (
    x.astype(f32).reshape((1,) * (rank - x.ndim) + x.shape) for x in (u, delta, B, C)
  )
  A = A.astype(f32)
  bias = 0.0 if delta_bias is None else delta_bias.astype(f32)
  chunk = min(CHUNK_TOKENS, length)
  blocks = -(-length // chunk)
  pad = blocks * chunk - length

  def chunked(x):  # [..., L, K] -> [blocks, chunk, ..., K] (padded tokens carry no signal)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(0, pad), (0, 0)])
    x = jnp.moveaxis(x, -2, 0)
    return x.reshape((blocks, chunk) + x.shape[1:])

  state_shape = jnp.broadcast_shapes(u.shape[:-2], delta.shape[:-2], B.shape[:-2]) + A.shape

  @jax.checkpoint
  def body(h, xs):
    u_c, delta_c, b_c, c_c = xs  # [chunk, ..., E] / [chunk, ..., N]
    dt = delta_c + bias
    if delta_softplus:
      dt = softplus(dt)
    decay = jnp.exp(dt[..., None] * A)
    drive = (dt * u_c)[..., None] * b_c[..., None, :]
    drive = drive.at[0].add(decay[0] * h)  # enter the chunk from the carried state
    states = _linear_recurrence_associative(decay, drive, 0)
    y = jnp.einsum('t...en,t...n->t...e', states, c_c, precision=jax.lax.Precision.HIGHEST)
    return states[-1], y

  _, ys = jax.lax.scan(body, jnp.zeros(state_shape, f32), tuple(map(chunked, (u, delta, B, C))))
  y = jnp.moveaxis(ys.reshape((blocks * chunk,) + ys.shape[2:]), 0, -2)[..., :length, :]
  if D is not None:
    y = y + u * D.astype(f32)
  return y.astype(out_dtype)


def selective_scan(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  delta_bias: jax.Array | None = None,
  *,
  delta_softplus: bool = True,
  impl: ScanImpl = 'associative',
) -> jax.Array:
  """Mamba-1 selective scan (see the module docstring), float32 state and accumulation.

  Args:
    u: [..., L, E] input.
    delta: [..., L, E] raw step size (before bias and softplus); leading axes broadcast
      against ``u`` (a direction axis of size 1 shares delta between scans).
    A: [E, N] state matrix (negative reals).
    B: [..., L, N] input projection per token.
    C: [..., L, N] readout per token; leading axes broadcast like ``delta``.
    D: optional [E] skip.
    delta_bias: optional [E] added to delta before softplus.
    delta_softplus: apply softplus to delta (mamba's ``delta_softplus=True``).
    impl: 'associative' (``jax.lax.associative_scan``, the default), 'sequential'
      (``jax.lax.scan``, the reference), 'chunked' (a ``lax.scan`` over rematerialised chunks
      of CHUNK_TOKENS tokens: only chunk-boundary states are kept for the backward pass),
      'fused' (Pallas GPU kernels, see scan_pallas), 'pallas_tpu' (Pallas TPU kernels, see
      scan_tpu) or 'auto' (see ``resolve_auto``).

  Returns:
    y: [..., L, E] in ``u.dtype``.
  """
  if impl not in SCAN_IMPLS:
    raise ValueError(f'unknown scan impl {impl!r}; expected one of {SCAN_IMPLS}')
  if impl == 'auto':
    impl = resolve_auto(u.shape[-2], u.shape[-1], delta_softplus)
  if impl == 'fused' and not scan_pallas.fused_backend_available():
    # No usable Pallas GPU backend here (a CPU/TPU, or a JAX without Triton): what 'auto' would
    # run instead. On a GPU, fused_backend_available() has logged a one-line notice.
    impl = resolve_auto(u.shape[-2], u.shape[-1], delta_softplus)
    impl = 'associative' if impl == 'fused' else impl
  if impl == 'fused':
    return scan_pallas.selective_scan_fused(
      u, delta, A, B, C, D, delta_bias, delta_softplus=delta_softplus
    )
  if impl == 'pallas_tpu':
    return scan_tpu.selective_scan_tpu(
      u, delta, A, B, C, D, delta_bias, delta_softplus=delta_softplus
    )
  if impl == 'chunked':
    return _selective_scan_chunked(u, delta, A, B, C, D, delta_bias, delta_softplus)
  f32 = jnp.float32
  out_dtype = u.dtype
  u, delta, A, B, C = (x.astype(f32) for x in (u, delta, A, B, C))
  if delta_bias is not None:
    delta = delta + delta_bias.astype(f32)
  if delta_softplus:
    delta = softplus(delta)
  token_axis = -3  # of the [..., L, E, N] state
  decay = jnp.exp(delta[..., None] * A)  # [..., L, E, N]
  drive = (delta * u)[..., None] * B[..., None, :]  # [..., L, E, N]
  states = _RECURRENCES[impl](decay, drive, token_axis)
  y = jnp.einsum('...len,...ln->...le', states, C, precision=jax.lax.Precision.HIGHEST)
  if D is not None:
    y = y + u * D.astype(f32)
  return y.astype(out_dtype)


def selective_scan_remat(*args, **kwargs) -> jax.Array:
  """``selective_scan`` under ``jax.checkpoint``: the [..., L, E, N] states are recomputed in
  the backward pass instead of being kept, which bounds training memory to the inputs."""
  fn = functools.partial(selective_scan, **kwargs)
  return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)(*args)
