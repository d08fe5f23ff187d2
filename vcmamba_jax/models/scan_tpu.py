"""Selective scan for TPUs (Pallas Mosaic kernels), forward and backward.

Same function as ``scan.selective_scan`` (float32 state and arithmetic), laid out for the TPU's
[8 sublanes, 128 lanes] vector registers: channels E on lanes (padded to a multiple of 128, e.g.
VCMamba-S's 576 to 640), the d_state N = 16 states on sublanes, so the running state h is one
[N, E_block] float32 value and every token is a handful of full-width vector operations. B and C
are passed transposed ([N, tokens], tokens on lanes): a token's column broadcasts over the
channels without any relayout.

Grid: (sequence, channel block, token block). The token-block axis runs sequentially ("arbitrary")
with the state carried in VMEM scratch; sequences up to ``MAX_BLOCK_TOKENS`` (VCMamba's 7x7 = 49
tokens at 224 px) are one block. With several token blocks the forward kernel also writes the
state at the start of every block, from which the backward kernel recomputes that block's
states (in VMEM) before running the adjoint recurrence backwards; a single block needs no
checkpoint at all. The [L, E, N] states never reach HBM.

Operands shared between scan directions (upstream VCMamba passes one delta and one C for the four
zig-zag scans, [B, 1, L, .] against u's [B, 4, L, E]) are read through the index map rather than
broadcast in HBM; their gradients are summed over the directions outside the kernel.

Runs anywhere with ``interpret=True`` (the Pallas interpreter; used by the CPU tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vcmamba_jax import sharding

LANES = 128
MAX_BLOCK_TOKENS = 64  # tokens per grid step; longer sequences are cut into blocks of this size
MAX_BLOCK_CHANNELS = 1024  # channels per grid step (lanes): [16, 1024] f32 state = 16 vregs
UNROLL = 8  # token steps per loop iteration


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


def _channel_block(padded_inner: int) -> int:
  """Largest multiple of 128 dividing `padded_inner` up to MAX_BLOCK_CHANNELS."""
  for block in range(min(padded_inner, MAX_BLOCK_CHANNELS), 0, -LANES):
    if padded_inner % block == 0:
      return block
  raise AssertionError(padded_inner)  # pragma: no cover - LANES always divides


def _layout(length: int) -> tuple[int, int]:
  """(tokens per block, number of blocks) for a sequence of `length` tokens."""
  if length <= MAX_BLOCK_TOKENS:
    return length, 1
  return MAX_BLOCK_TOKENS, -(-length // MAX_BLOCK_TOKENS)


def _div(index, share):
  """index // share for grid indices (>= 0): lax.div, because jnp's floor division lowers through
  sign(), which Mosaic can only lower knowing the TPU generation (unknown when compiling ahead of
  time on a CPU host)."""
  return index if share == 1 else jax.lax.div(index, share)


def _softplus(x):
  return jnp.where(x > 20.0, x, jnp.log(1.0 + jnp.exp(jnp.minimum(x, 20.0))))


def _sigmoid(x):
  return jnp.where(x > 20.0, 1.0, 1.0 / (1.0 + jnp.exp(-jnp.minimum(x, 20.0))))


def _column(matrix, lane, t):
  """matrix[:, t:t+1] of a [N, T] value for a traced t: a masked lane reduction (a dynamic lane
  slice has no cheap Mosaic lowering); `lane` is the lane iota of matrix's shape."""
  return jnp.sum(jnp.where(lane == t, matrix, 0.0), axis=1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Kernels. Refs (leading grid axes squeezed): u/delta/y/dy/du/ddelta [T, Eb]; at (A transposed)
# [N, Eb]; bt/ct [N, T]; d/bias [1, Eb]; checkpoints [N, Eb]; da [N, Eb]; dbt/dct [N, T].
# ---------------------------------------------------------------------------------------------
def _fwd_kernel(
  u_ref, delta_ref, at_ref, bt_ref, ct_ref, d_ref, bias_ref, *refs, tokens, checkpointed
):
  if checkpointed:
    y_ref, hs_ref, h_scr, u_scr, dt_scr, y_scr = refs
  else:
    y_ref, h_scr, u_scr, dt_scr, y_scr = refs
  from jax.experimental import pallas as pl

  f32 = jnp.float32

  @pl.when(pl.program_id(2) == 0)
  def _zero_state():
    h_scr[...] = jnp.zeros(h_scr.shape, f32)

  if checkpointed:
    hs_ref[...] = h_scr[...]  # the state entering this block, for the backward kernel
  at = at_ref[...]
  d = d_ref[...]
  bt = bt_ref[...].astype(f32)
  ct = ct_ref[...].astype(f32)
  u_scr[...] = u_ref[...].astype(f32)
  dt_scr[...] = _softplus(delta_ref[...].astype(f32) + bias_ref[...])
  lane = jax.lax.broadcasted_iota(jnp.int32, bt.shape, 1)

  def step(t, h):
    u = u_scr[pl.ds(t, 1), :]
    dt = dt_scr[pl.ds(t, 1), :]
    h = jnp.exp(dt * at) * h + _column(bt, lane, t) * (dt * u)
    y_scr[pl.ds(t, 1), :] = jnp.sum(h * _column(ct, lane, t), axis=0, keepdims=True) + d * u
    return h

  h_scr[...] = jax.lax.fori_loop(0, tokens, step, h_scr[...], unroll=min(tokens, UNROLL))
  y_ref[...] = y_scr[...].astype(y_ref.dtype)


def _bwd_kernel(
  u_ref, delta_ref, at_ref, bt_ref, ct_ref, d_ref, bias_ref, *refs, tokens, checkpointed
):
  if checkpointed:
    hs_ref, dy_ref, du_ref, ddelta_ref, da_ref, dbt_ref, dct_ref = refs[:7]
  else:
    hs_ref = None
    dy_ref, du_ref, ddelta_ref, da_ref, dbt_ref, dct_ref = refs[:6]
  gs_scr, states_scr, u_scr, raw_scr, dy_scr, du_scr, ddt_scr = refs[-7:]
  from jax.experimental import pallas as pl

  f32 = jnp.float32
  seq, block = pl.program_id(2), pl.program_id(3)

  @pl.when((seq == 0) & (block == 0))
  def _zero_da():
    da_ref[...] = jnp.zeros(da_ref.shape, f32)

  @pl.when(block == 0)  # the last token block of a sequence comes first
  def _zero_grad_state():
    gs_scr[...] = jnp.zeros(gs_scr.shape, f32)

  at = at_ref[...]
  d = d_ref[...]
  bt = bt_ref[...].astype(f32)
  ct = ct_ref[...].astype(f32)
  u_scr[...] = u_ref[...].astype(f32)
  raw_scr[...] = delta_ref[...].astype(f32) + bias_ref[...]
  dy_scr[...] = dy_ref[...].astype(f32)
  h_start = hs_ref[...] if checkpointed else jnp.zeros(at.shape, f32)

  lane = jax.lax.broadcasted_iota(jnp.int32, bt.shape, 1)
  unroll = min(tokens, UNROLL)

  # Recompute the block's states in VMEM: states_scr[t + 1] = h_t, states_scr[0] = h_{-1}.
  states_scr[0] = h_start

  def forward_step(t, h):
    dt = _softplus(raw_scr[pl.ds(t, 1), :])
    h = jnp.exp(dt * at) * h + _column(bt, lane, t) * (dt * u_scr[pl.ds(t, 1), :])
    states_scr[t + 1] = h
    return h

  jax.lax.fori_loop(0, tokens, forward_step, h_start, unroll=unroll)

  # Adjoint recurrence, last token first; gs = dL/dh_t.
  def backward_step(i, carry):
    gs, grad_a, db_cols, dc_cols = carry
    t = tokens - 1 - i
    raw = raw_scr[pl.ds(t, 1), :]
    dt = _softplus(raw)
    u = u_scr[pl.ds(t, 1), :]
    dy = dy_scr[pl.ds(t, 1), :]
    decay = jnp.exp(dt * at)
    gs = gs + _column(ct, lane, t) * dy
    gb = jnp.sum(gs * _column(bt, lane, t), axis=0, keepdims=True)  # [1, Eb]
    through_decay = gs * states_scr[t] * decay  # dL/d(decay_t) * decay_t
    ddt = jnp.sum(through_decay * at, axis=0, keepdims=True) + gb * u
    grad_a = grad_a + through_decay * dt
    ddt_scr[pl.ds(t, 1), :] = ddt * _sigmoid(raw)
    du_scr[pl.ds(t, 1), :] = gb * dt + d * dy
    db_cols = jnp.where(lane == t, jnp.sum(gs * (dt * u), axis=1, keepdims=True), db_cols)
    dc_cols = jnp.where(lane == t, jnp.sum(states_scr[t + 1] * dy, axis=1, keepdims=True), dc_cols)
    return gs * decay, grad_a, db_cols, dc_cols  # gs carried to token t - 1

  zeros = jnp.zeros(bt.shape, f32)
  gs, grad_a, db_cols, dc_cols = jax.lax.fori_loop(
    0, tokens, backward_step, (gs_scr[...], jnp.zeros(at.shape, f32), zeros, zeros), unroll=unroll
  )
  gs_scr[...] = gs
  da_ref[...] += grad_a
  dbt_ref[...] = db_cols
  dct_ref[...] = dc_cols
  du_ref[...] = du_scr[...].astype(du_ref.dtype)
  ddelta_ref[...] = ddt_scr[...].astype(ddelta_ref.dtype)


# ---------------------------------------------------------------------------------------------
# pallas_call wrappers on the padded, flattened layout:
#   u [S, Lp, Ep]; delta [S // rd, Lp, Ep]; at [N, Ep]; bt [S // rb, nb, N, T];
#   ct [S // rc, nb, N, T]; d, bias [1, Ep]. rd/rb/rc: how many consecutive sequences share one.
# ---------------------------------------------------------------------------------------------
def _compiler_params(semantics, interpret):
  if interpret:
    return None
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.CompilerParams(dimension_semantics=semantics)


def _vmem(shape):
  from jax.experimental.pallas import tpu as pltpu

  return pltpu.VMEM(shape, jnp.float32)


def _forward(u, delta, at, bt, ct, d, bias, shares, interpret):
  from jax.experimental import pallas as pl

  rd, rb, rc = shares
  seqs, padded_len, padded_inner = u.shape
  state = at.shape[0]
  tokens, blocks = bt.shape[-1], bt.shape[1]
  eb = _channel_block(padded_inner)
  checkpointed = blocks > 1
  seq = lambda r: pl.BlockSpec((None, tokens, eb), lambda s, e, k: (_div(s, r), k, e))
  tok = lambda r: pl.BlockSpec((None, None, state, tokens), lambda s, e, k: (_div(s, r), k, 0, 0))
  mat = pl.BlockSpec((state, eb), lambda s, e, k: (0, e))
  vec = pl.BlockSpec((1, eb), lambda s, e, k: (0, e))
  out_shape = [jax.ShapeDtypeStruct(u.shape, u.dtype)]
  out_specs = [seq(1)]
  if checkpointed:
    out_shape.append(jax.ShapeDtypeStruct((seqs, blocks, state, padded_inner), jnp.float32))
    out_specs.append(pl.BlockSpec((None, None, state, eb), lambda s, e, k: (s, k, 0, e)))
  outs = pl.pallas_call(
    functools.partial(_fwd_kernel, tokens=tokens, checkpointed=checkpointed),
    out_shape=tuple(out_shape),
    grid=(seqs, padded_inner // eb, blocks),
    in_specs=[seq(1), seq(rd), mat, tok(rb), tok(rc), vec, vec],
    out_specs=tuple(out_specs),
    scratch_shapes=[
      _vmem((state, eb)),
      _vmem((tokens, eb)),
      _vmem((tokens, eb)),
      _vmem((tokens, eb)),
    ],
    compiler_params=_compiler_params(('parallel', 'parallel', 'arbitrary'), interpret),
    interpret=interpret,
  )(u, delta, at, bt, ct, d, bias)
  return outs[0], (outs[1] if checkpointed else None)


def _backward(u, delta, at, bt, ct, d, bias, checkpoints, dy, shares, interpret):
  from jax.experimental import pallas as pl

  rd, rb, rc = shares
  seqs, padded_len, padded_inner = u.shape
  state = at.shape[0]
  tokens, blocks = bt.shape[-1], bt.shape[1]
  eb = _channel_block(padded_inner)
  eblocks = padded_inner // eb
  checkpointed = checkpoints is not None
  # Two groups of sequences on a parallel axis (the two TensorCores of a v4/v5p chip); within a
  # group the sequences and token blocks run in order, accumulating dA in its output block.
  groups = 2 if seqs % 2 == 0 else 1
  per_group = seqs // groups
  rev = lambda k: blocks - 1 - k
  sid = lambda g, s: g * per_group + s
  seq = lambda r: pl.BlockSpec(
    (None, tokens, eb), lambda g, e, s, k: (_div(sid(g, s), r), rev(k), e)
  )
  tok = lambda r: pl.BlockSpec(
    (None, None, state, tokens), lambda g, e, s, k: (_div(sid(g, s), r), rev(k), 0, 0)
  )
  mat = pl.BlockSpec((state, eb), lambda g, e, s, k: (0, e))
  vec = pl.BlockSpec((1, eb), lambda g, e, s, k: (0, e))
  f32 = jnp.float32
  in_specs = [seq(1), seq(rd), mat, tok(rb), tok(rc), vec, vec]
  operands = [u, delta, at, bt, ct, d, bias]
  if checkpointed:
    in_specs.append(
      pl.BlockSpec((None, None, state, eb), lambda g, e, s, k: (sid(g, s), rev(k), 0, e))
    )
    operands.append(checkpoints)
  in_specs.append(seq(1))
  operands.append(dy)
  partial_tok = pl.BlockSpec(
    (None, None, None, state, tokens), lambda g, e, s, k: (e, sid(g, s), rev(k), 0, 0)
  )
  du, ddelta, da, dbt, dct = pl.pallas_call(
    functools.partial(_bwd_kernel, tokens=tokens, checkpointed=checkpointed),
    out_shape=(
      jax.ShapeDtypeStruct(u.shape, f32),
      jax.ShapeDtypeStruct(u.shape, f32),
      jax.ShapeDtypeStruct((groups, state, padded_inner), f32),
      jax.ShapeDtypeStruct((eblocks, seqs, blocks, state, tokens), f32),
      jax.ShapeDtypeStruct((eblocks, seqs, blocks, state, tokens), f32),
    ),
    grid=(groups, eblocks, per_group, blocks),
    in_specs=in_specs,
    out_specs=(
      seq(1),
      seq(1),
      pl.BlockSpec((None, state, eb), lambda g, e, s, k: (g, 0, e)),
      partial_tok,
      partial_tok,
    ),
    scratch_shapes=[
      _vmem((state, eb)),
      _vmem((tokens + 1, state, eb)),
      _vmem((tokens, eb)),
      _vmem((tokens, eb)),
      _vmem((tokens, eb)),
      _vmem((tokens, eb)),
      _vmem((tokens, eb)),
    ],
    compiler_params=_compiler_params(('parallel', 'parallel', 'arbitrary', 'arbitrary'), interpret),
    interpret=interpret,
  )(*operands)
  return du, ddelta, da.sum(0), dbt.sum(0), dct.sum(0)


# ---------------------------------------------------------------------------------------------
# Differentiable core on the padded layout.
# ---------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _scan(u, delta, at, bt, ct, d, bias, shares, interpret):
  return _forward(u, delta, at, bt, ct, d, bias, shares, interpret)[0]


def _scan_fwd(u, delta, at, bt, ct, d, bias, shares, interpret):
  y, checkpoints = _forward(u, delta, at, bt, ct, d, bias, shares, interpret)
  return y, (u, delta, at, bt, ct, d, bias, checkpoints)


def _group_sum(x, share):
  """Sums per-sequence gradients over each group of `share` sequences that shared an input."""
  if share == 1:
    return x
  return x.reshape((x.shape[0] // share, share) + x.shape[1:]).sum(1)


def _scan_bwd(shares, interpret, residuals, dy):
  u, delta, at, bt, ct, d, bias, checkpoints = residuals
  rd, rb, rc = shares
  du, ddelta, dat, dbt, dct = _backward(
    u, delta, at, bt, ct, d, bias, checkpoints, dy, shares, interpret
  )
  f32 = jnp.float32
  dd = jnp.sum(dy.astype(f32) * u.astype(f32), axis=(0, 1))[None]
  dbias = jnp.sum(ddelta, axis=(0, 1))[None]
  return (
    du.astype(u.dtype),
    _group_sum(ddelta, rd).astype(delta.dtype),
    dat.astype(at.dtype),
    _group_sum(dbt, rb).astype(bt.dtype),
    _group_sum(dct, rc).astype(ct.dtype),
    dd.astype(d.dtype),
    dbias.astype(bias.dtype),
  )


_scan.defvjp(_scan_fwd, _scan_bwd)


# ---------------------------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------------------------
def _flatten_shared(x, lead, trailing):
  """x [*lead_x, *trailing] broadcastable to [*lead, *trailing] -> ([S // r, *trailing], r).

  r > 1 when x is shared along the last leading axis (size 1 there, e.g. delta of the four
  directions); any other broadcast is materialised.
  """
  x_lead = x.shape[: x.ndim - len(trailing)]
  x_lead = (1,) * (len(lead) - len(x_lead)) + tuple(x_lead)
  x = x.reshape(x_lead + tuple(trailing))
  if x_lead == tuple(lead):
    return x.reshape((-1,) + tuple(trailing)), 1
  if lead and x_lead[:-1] == tuple(lead[:-1]) and x_lead[-1] == 1:
    return x.reshape((-1,) + tuple(trailing)), lead[-1]
  x = jnp.broadcast_to(x, tuple(lead) + tuple(trailing))
  return x.reshape((-1,) + tuple(trailing)), 1


def selective_scan_tpu(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  delta_bias: jax.Array | None = None,
  *,
  delta_softplus: bool = True,
  interpret: bool = False,
) -> jax.Array:
  """TPU-kernel selective scan with the signature and semantics of ``scan.selective_scan``.

  Args:
    u: [..., L, E] input (float32 or bfloat16).
    delta: [..., L, E] raw step size; leading axes broadcast against u's.
    A: [E, N] state matrix.
    B, C: [..., L, N]; leading axes broadcast against u's.
    D: optional [E] skip; delta_bias: optional [E].
    delta_softplus: must be True (the VCMamba/mamba default).
    interpret: run the kernels in the Pallas interpreter (any backend, e.g. CPU tests).

  Returns:
    y: [..., L, E] in u.dtype. Differentiable (custom VJP with a backward kernel).

  Under a mesh context (``jax.sharding.use_abstract_mesh``, set by the trainer's jitted steps)
  the kernels run per device in a ``shard_map``: Mosaic kernels cannot be partitioned by XLA.
  Axis 0 (the batch) is split over every mesh axis, as the trainer splits batches; a batch the
  mesh does not divide (e.g. model.init's single image) is computed whole on every device.
  """
  if not delta_softplus:
    raise NotImplementedError('the TPU scan implements delta_softplus=True only')
  fn = functools.partial(_selective_scan_local, interpret=interpret)
  inner = u.shape[-1]
  D = jnp.zeros((inner,), jnp.float32) if D is None else D
  delta_bias = jnp.zeros((inner,), jnp.float32) if delta_bias is None else delta_bias
  if u.ndim < 3:  # no batch axis to split
    return fn(u, delta, A, B, C, D, delta_bias)
  batched = [x.ndim == u.ndim for x in (u, delta, A, B, C, D, delta_bias)]
  return sharding.per_device(fn, u, delta, A, B, C, D, delta_bias, batched=batched)


def _selective_scan_local(
  u: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  delta_bias: jax.Array | None = None,
  *,
  interpret: bool = False,
) -> jax.Array:
  """`selective_scan_tpu` on one device's arrays."""
  lead, (length, inner) = u.shape[:-2], u.shape[-2:]
  state = A.shape[-1]
  f32 = jnp.float32
  tokens, blocks = _layout(length)
  padded_len = tokens * blocks
  padded_inner = _round_up(inner, LANES)
  pad_e, pad_l = padded_inner - inner, padded_len - length

  u_flat, _ = _flatten_shared(u, lead, (length, inner))
  delta_flat, rd = _flatten_shared(delta, lead, (length, inner))
  b_flat, rb = _flatten_shared(B, lead, (length, state))
  c_flat, rc = _flatten_shared(C, lead, (length, state))

  def seq_pad(x):  # [S, L, E] -> [S, Lp, Ep] (zeros: padded tokens/channels carry no signal)
    return jnp.pad(x, ((0, 0), (0, pad_l), (0, pad_e)))

  def tok_layout(x):  # [S, L, N] -> [S, blocks, N, T]
    x = jnp.pad(x, ((0, 0), (0, pad_l), (0, 0)))
    return x.reshape(x.shape[0], blocks, tokens, state).transpose(0, 1, 3, 2)

  def vec(x):
    x = jnp.zeros((inner,), f32) if x is None else x.astype(f32)
    return jnp.pad(x, (0, pad_e))[None]

  at = jnp.pad(A.astype(f32).T, ((0, 0), (0, pad_e)))
  y = _scan(
    seq_pad(u_flat),
    seq_pad(delta_flat),
    at,
    tok_layout(b_flat),
    tok_layout(c_flat),
    vec(D),
    vec(delta_bias),
    (rd, rb, rc),
    interpret,
  )
  return y[:, :length, :inner].reshape(u.shape)
