"""Fused selective scan for GPUs (Pallas/Triton), forward and backward kernels.

Same function as ``scan.selective_scan`` (float32 state), but the [L, E, N] states never reach
device memory: one program owns a (sequence, block of channels) pair and walks the L tokens with
the [block, N] state in registers. The forward kernel also writes the state at the end of every
chunk of up to 8 tokens; the backward kernel walks the chunks in reverse, recomputes each chunk's
states from its checkpoint (in registers) and runs the adjoint recurrence. Only chunks are
unrolled at trace time, so compile time does not grow with L.

Checked against the sequential reference in tests (interpret mode on the CPU) and in
``scripts/benchmark_scan.py`` on the GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax import sharding
from vcmamba_jax.models import pallas_gpu

MAX_UNROLLED_LENGTH = 64
# Launch settings: channels and warps per program, Triton's software pipelining of the chunk
# loop's loads. One warp per program: the sums over a block's channels (dB, dC: every token in
# the backward) need no barrier (deviceless PTX at B's shapes, backward: 8,052 warp-instructions
# and 84 barriers a chunk per 32 channels with 32 channels / 4 warps, 5,494 and 14 with 16 / 1).
# Measured on an H100 (2026-12-07, `benchmark_scan.py --fused_blocks`, fwd / fwd+bwd ms): B at
# batch 128, 64/32 channels, 4 warps, 1 stage 0.70 / 3.78; 32/16, 1 warp, 3 stages 0.56 / 3.10;
# S at batch 256 0.95 / 4.51 -> 0.63 / 3.64; M 1.35 / 6.65 -> 1.10 / 5.85. B's train step
# 87.3 -> 84.3 ms.
FWD_BLOCK = 32
BWD_BLOCK = 16
NUM_STAGES = 3
FWD_WARPS = 1
BWD_WARPS = 1
# The recurrences' multiply-adds as one PTX fma.rn.f32 each (`pallas_gpu.fma`; 0: Triton's
# mul.rn + add.rn, as before session 27). Deviceless PTX at B's shapes (batch 128, sm_90a),
# not yet timed: forward 1,489 -> 1,370 instructions, backward 2,712 -> 2,516 (its 20 bytes of
# register spills gone).
USE_FMA = 1


def _block(inner: int, preferred: int) -> int:
  block = preferred
  while inner % block:
    block //= 2
  if block < 8:
    raise ValueError(f'channel count {inner} needs a multiple of 8 for the fused scan')
  return block


_LOG2E = float(np.log2(np.e))


def _softplus(x):
  return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp2(jnp.minimum(x, 20.0) * _LOG2E)))


# The kernels are instruction-bound (B's forward: ~270 instructions per token and thread).
# exp2 lowers to the hardware's ex2.approx alone; exp to a range reduction around it (5-8 more
# instructions per element): every exp(z) here is exp2(z * log2(e)), with A * log2(e) taken once.
# (log2 lowers to log's polynomial and a division: log stays.)


def _chunk_size(length: int) -> int:
  """Largest divisor of ``length`` up to 8: states are checkpointed at chunk ends."""
  return max(c for c in range(1, 9) if length % c == 0)


def _load_step(t, u_ref, delta_ref, b_ref, bias):
  f32 = jnp.float32
  raw = delta_ref[t, :].astype(f32) + bias
  return raw, _softplus(raw), u_ref[t, :].astype(f32), b_ref[t, :].astype(f32)


def _fwd_kernel(*refs, length, chunk, write_states, fma):
  """y, and with `write_states` (for the backward pass) the state after every chunk. `fma`:
  the multiply-adds as PTX fma (`pallas_gpu.fma`)."""
  u_ref, delta_ref, a_ref, b_ref, c_ref, d_ref, bias_ref, y_ref = refs[:8]
  hs_ref = refs[8] if write_states else None
  f32 = jnp.float32
  A = a_ref[...].astype(f32)  # [blk, N]
  A2 = A * _LOG2E  # exp(dt * A) = exp2(dt * A2)
  D = d_ref[...].astype(f32)
  bias = bias_ref[...].astype(f32)

  def chunk_body(j, h):
    for i in range(chunk):  # unrolled: short straight-line code, a fori_loop over chunks
      t = j * chunk + i
      _, dt, u, b = _load_step(t, u_ref, delta_ref, b_ref, bias)
      h = pallas_gpu.fma(jnp.exp2(dt[:, None] * A2), h, (dt * u)[:, None] * b[None, :], fma)
      y = pallas_gpu.fma(D, u, jnp.sum(h * c_ref[t, :].astype(f32)[None, :], axis=1), fma)
      y_ref[t, :] = y.astype(y_ref.dtype)
    if hs_ref is not None:
      hs_ref[j, :, :] = h  # state after the chunk: the backward pass restarts from it
    return h

  jax.lax.fori_loop(0, length // chunk, chunk_body, jnp.zeros(A.shape, f32))


def _bwd_kernel(
  u_ref,
  delta_ref,
  a_ref,
  b_ref,
  c_ref,
  d_ref,
  bias_ref,
  hs_ref,
  dy_ref,
  du_ref,
  ddelta_ref,
  da_ref,
  db_ref,
  dc_ref,
  *,
  length,
  chunk,
  fma,
):
  f32 = jnp.float32
  A = a_ref[...].astype(f32)
  A2 = A * _LOG2E
  D = d_ref[...].astype(f32)
  bias = bias_ref[...].astype(f32)
  num_chunks = length // chunk

  def chunk_body(r, carry):
    grad_state, grad_a = carry
    j = num_chunks - 1 - r
    # Recompute the chunk's states from the checkpoint before it.
    h_start = jnp.where(j > 0, hs_ref[jnp.maximum(j - 1, 0), :, :], 0.0)
    # The chunk's inputs, softplus and decays are kept (registers: the chunk is unrolled) for
    # the adjoint loop below instead of being loaded and computed again.
    states, steps = [h_start], []
    for i in range(chunk):
      raw, dt, u, b = _load_step(j * chunk + i, u_ref, delta_ref, b_ref, bias)
      decay = jnp.exp2(dt[:, None] * A2)
      steps.append((raw, dt, u, b, decay))
      states.append(pallas_gpu.fma(decay, states[-1], (dt * u)[:, None] * b[None, :], fma))
    for i in reversed(range(chunk)):
      t = j * chunk + i
      raw, dt, u, b, decay = steps[i]
      c = c_ref[t, :].astype(f32)
      dy = dy_ref[t, :].astype(f32)
      grad_state = pallas_gpu.fma(dy[:, None], c[None, :], grad_state, fma)  # dL/dh_t
      gb = jnp.sum(grad_state * b[None, :], axis=1)
      through_decay = grad_state * states[i] * decay  # dL/da_t * a_t (h_{-1} = 0)
      ddt = pallas_gpu.fma(gb, u, jnp.sum(through_decay * A, axis=1), fma)
      grad_a = pallas_gpu.fma(through_decay, dt[:, None], grad_a, fma)
      sig = jnp.where(raw > 20.0, 1.0, 1.0 / (1.0 + jnp.exp2(-jnp.minimum(raw, 20.0) * _LOG2E)))
      ddelta_ref[t, :] = (ddt * sig).astype(ddelta_ref.dtype)
      du_ref[t, :] = pallas_gpu.fma(gb, dt, D * dy, fma).astype(du_ref.dtype)
      db_ref[t, :] = jnp.sum(grad_state * (dt * u)[:, None], axis=0)
      dc_ref[t, :] = jnp.sum(states[i + 1] * dy[:, None], axis=0)
      grad_state = grad_state * decay  # carried to step t-1
    return grad_state, grad_a

  zeros = jnp.zeros(A.shape, f32)
  _, grad_a = jax.lax.fori_loop(0, num_chunks, chunk_body, (zeros, zeros))
  da_ref[...] = grad_a


def _specs(length, inner, state, block):
  from jax.experimental import pallas as pl

  seq = pl.BlockSpec((None, length, block), lambda i, j: (i, 0, j))
  tok = pl.BlockSpec((None, length, state), lambda i, j: (i, 0, 0))
  mat = pl.BlockSpec((block, state), lambda i, j: (j, 0))
  vec = pl.BlockSpec((block,), lambda i, j: (j,))
  return seq, tok, mat, vec


def _forward(u, delta, A, B, C, D, bias, interpret, write_states=True):
  """(y, the state checkpoints) or, without `write_states` (inference: nothing differentiates),
  (y, None): the kernel then does not write the [seqs, L / chunk, E, N] float32 checkpoints
  (470 MB a Mamba layer for B at batch 256). Per device under a mesh (`sharding.per_device`)."""
  local = functools.partial(_forward_local, interpret=interpret, write_states=write_states)
  operands = (u, delta, A, B, C, D, bias)
  out = sharding.per_device(local, *operands, batched=[x.ndim == 3 for x in operands])
  return out[0], (out[1] if write_states else None)


def _forward_local(u, delta, A, B, C, D, bias, *, interpret, write_states):
  from jax.experimental import pallas as pl

  seqs, length, inner = u.shape
  state = A.shape[1]
  block = _block(inner, FWD_BLOCK)
  seq, tok, mat, vec = _specs(length, inner, state, block)
  chunk = _chunk_size(length)
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype)]
  out_specs = [seq]
  if write_states:
    out_shape.append(jax.ShapeDtypeStruct((seqs, length // chunk, inner, state), jnp.float32))
    out_specs.append(pl.BlockSpec((None, length // chunk, block, state), lambda i, j: (i, 0, j, 0)))
  call = pl.pallas_call(
    functools.partial(
      _fwd_kernel,
      length=length,
      chunk=chunk,
      write_states=write_states,
      fma=bool(USE_FMA) and not interpret,
    ),
    out_shape=tuple(out_shape),
    grid=(seqs, inner // block),
    in_specs=[seq, seq, mat, tok, tok, vec, vec],
    out_specs=tuple(out_specs),
    compiler_params=None if interpret else pallas_gpu.compiler_params(FWD_WARPS, NUM_STAGES),
    interpret=interpret,
  )
  return call(u, delta, A, B, C, D, bias)


def _backward(u, delta, A, B, C, D, bias, checkpoints, dy, interpret):
  operands = (u, delta, A, B, C, D, bias, checkpoints, dy)
  local = functools.partial(_backward_kernels, interpret=interpret)
  batched = [x.ndim >= 3 for x in operands]
  du, ddelta, da, db, dc = sharding.per_device(local, *operands, batched=batched)
  dy32, u32 = dy.astype(jnp.float32), u.astype(jnp.float32)
  return (
    du.astype(u.dtype),
    ddelta.astype(delta.dtype),
    da.sum(0).astype(A.dtype),
    db.sum(2).astype(B.dtype),
    dc.sum(2).astype(C.dtype),
    jnp.sum(dy32 * u32, axis=(0, 1)).astype(D.dtype),
    ddelta.sum(axis=(0, 1)).astype(bias.dtype),
  )


def _backward_kernels(u, delta, A, B, C, D, bias, checkpoints, dy, *, interpret):
  """The backward kernel: du, ddelta [seqs, L, E] and the per-sequence (and channel-block)
  partials of dA [seqs, E, N], dB and dC [seqs, L, blocks, N] (float32)."""
  from jax.experimental import pallas as pl

  seqs, length, inner = u.shape
  state = A.shape[1]
  block = _block(inner, BWD_BLOCK)
  blocks = inner // block
  seq, tok, mat, vec = _specs(length, inner, state, block)
  f32 = jnp.float32
  partial_tok = pl.BlockSpec((None, length, None, state), lambda i, j: (i, 0, j, 0))
  partial_mat = pl.BlockSpec((None, block, state), lambda i, j: (i, j, 0))
  chunk = _chunk_size(length)
  checkpoint_spec = pl.BlockSpec((None, length // chunk, block, state), lambda i, j: (i, 0, j, 0))
  return pl.pallas_call(
    functools.partial(_bwd_kernel, length=length, chunk=chunk, fma=bool(USE_FMA) and not interpret),
    out_shape=(
      jax.ShapeDtypeStruct(u.shape, f32),
      jax.ShapeDtypeStruct(u.shape, f32),
      jax.ShapeDtypeStruct((seqs, inner, state), f32),
      jax.ShapeDtypeStruct((seqs, length, blocks, state), f32),
      jax.ShapeDtypeStruct((seqs, length, blocks, state), f32),
    ),
    grid=(seqs, blocks),
    in_specs=[seq, seq, mat, tok, tok, vec, vec, checkpoint_spec, seq],
    out_specs=(seq, seq, partial_mat, partial_tok, partial_tok),
    compiler_params=None if interpret else pallas_gpu.compiler_params(BWD_WARPS, NUM_STAGES),
    interpret=interpret,
  )(u, delta, A, B, C, D, bias, checkpoints, dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _fused_scan(u, delta, A, B, C, D, bias, interpret):
  # Not differentiated (inference): the forward without its checkpoints.
  return _forward(u, delta, A, B, C, D, bias, interpret, write_states=False)[0]


def _fused_scan_fwd(u, delta, A, B, C, D, bias, interpret):
  y, checkpoints = _forward(u, delta, A, B, C, D, bias, interpret)
  return y, (u, delta, A, B, C, D, bias, checkpoints)


def _fused_scan_bwd(interpret, residuals, dy):
  return _backward(*residuals, dy, interpret)


_fused_scan.defvjp(_fused_scan_fwd, _fused_scan_bwd)


def selective_scan_fused(
  u, delta, A, B, C, D=None, delta_bias=None, *, delta_softplus=True, interpret: bool = False
):
  """Fused-kernel selective scan with the signature and semantics of ``scan.selective_scan``.

  Leading axes of delta/B/C broadcast against u's. Differentiable (custom VJP with a fused
  backward kernel). ``interpret=True`` runs the kernels in the Pallas interpreter (any backend).
  """
  if not delta_softplus:
    raise NotImplementedError('the fused scan implements delta_softplus=True only')
  lead, (length, inner) = u.shape[:-2], u.shape[-2:]
  state = A.shape[-1]
  delta = jnp.broadcast_to(delta, lead + (length, inner)).reshape(-1, length, inner)
  B = jnp.broadcast_to(B, lead + (length, state)).reshape(-1, length, state)
  C = jnp.broadcast_to(C, lead + (length, state)).reshape(-1, length, state)
  D = jnp.zeros((inner,), jnp.float32) if D is None else D
  bias = jnp.zeros((inner,), jnp.float32) if delta_bias is None else delta_bias
  y = _fused_scan(
    u.reshape(-1, length, inner),
    delta,
    A.astype(jnp.float32),
    B,
    C,
    D.astype(jnp.float32),
    bias.astype(jnp.float32),
    interpret,
  )
  return y.reshape(u.shape)


@functools.cache
def fused_backend_available() -> bool:
  """Whether this JAX can compile and run the kernels on the default backend (a GPU).

  Compiles and runs a tiny forward + backward once per process (also when first asked while an
  outer function is being traced). If Pallas's Triton backend is missing or broken (it is
  deprecated from JAX 0.11 and may be removed), logs a one-line notice and returns False: callers
  then use the XLA scan instead of failing.
  """
  if jax.default_backend() != 'gpu':
    return False
  return probe_fused_kernels()


def probe_fused_kernels() -> bool:
  """Lowers, compiles and runs the fused kernels on tiny inputs; False (with one
  logged line) on any failure. Independent of any trace in progress: it lowers from shapes and
  runs on NumPy inputs."""

  def run():
    f32 = np.float32
    u = np.ones((1, 8, 8), f32)
    n = np.ones((1, 8, 16), f32)
    args = (u, u, -np.ones((8, 16), f32), n, n, np.ones((8,), f32), np.zeros((8,), f32))
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    for fn in (  # training (both kernels) and inference (the forward without checkpoints)
      jax.jit(jax.grad(lambda *a: _fused_scan(*a, False).sum(), argnums=(0, 1))),
      jax.jit(lambda *a: _fused_scan(*a, False)),
    ):
      jax.block_until_ready(fn.lower(*specs).compile()(*args))

  return pallas_gpu.probe(run, 'fused Pallas scan', "the XLA scan ('associative')")


def fused_scan_supported(length: int, inner: int) -> bool:
  """Whether the fused kernel applies on this backend and shape (else use 'associative')."""
  if jax.default_backend() != 'gpu' or length > MAX_UNROLLED_LENGTH or inner % 8:
    return False
  return fused_backend_available()
