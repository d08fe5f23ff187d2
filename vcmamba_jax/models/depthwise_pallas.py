"""The KxK depthwise convolution as Pallas/Triton kernels (GPUs): a forward pass that also gives
its output's batch moments, and the backward pass.

Why: in an H100 profile of B's train step (docs/benchmarks/h100_bf16_profile_b_train.json) the
XLA formulation of the taps VJP (`ops._depthwise_taps_bwd`) costs ~22 ms: the K*K kernel-gradient
sums of a stage-1 block run as 6 reduction kernels (1.16 ms against ~0.12 ms of bytes) and the
input gradient is a 9-tap stencil fused into BatchNorm's backward. The backward kernel reads x and
the output gradient g once per program row (the K*K shifted reads hit the cache) and writes the
input gradient and per-program kernel- and bias-gradient partials in the same pass. The forward
(6.6 ms in that profile, the taps fused into the next BatchNorm's mean) writes y and, from the
rows it holds in registers, its rows' mean and sum of squared deviations, so that BatchNorm
skips both statistics passes (`ops.batch_norm_train(..., moments=...)`).

Layout: one program owns (image, block of channels, chunk of rows: `LaunchConfig.rows`) and walks
its rows. Loads and stores are power-of-two tiles [Wp, block] of a row (Wp = W rounded up to a
power of two) whose columns outside the image are masked, so the kernels read and write the
arrays as they are (no padded copies); rows outside the image are clamped and multiplied by zero.
The Pallas interpreter clamps an out-of-bounds slice instead of masking it, so in interpret mode
(the CPU tests) the inputs are zero-padded in W and the outputs sliced: the same kernel code.

On GPUs the training default (`depthwise_impl='auto'`): on one H100 (2026-12-08, B, bf16, batch
128) B's train step took 72.0 ms with these kernels against 81.3 ms with the taps VJP, at the same
peak memory (9.46 GiB). Checked against the XLA formulation in tests (interpret mode on the CPU)
and by `scripts/check_kernels.py` on the GPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax import sharding
from vcmamba_jax.models import pallas_gpu

ACC_ELEMENTS = 4096  # cap on K*K * block: the kernel-gradient accumulators live in registers


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
  """tile_elements: target Wp * block of a program's tiles; num_warps: Triton warps per program;
  num_stages: Triton's software pipelining of the row loop's loads (1: none); rows: rows a
  program walks at most (the largest divisor of H up to it; 0: all H rows, one program per
  image and channel block). Both kernels use it. Their sums over pixels (the kernel and bias
  gradients, the moments) are [Wp, blk] tiles summed over W once at a program's end: summed over
  W every row instead (a cross-warp reduction, with its barrier, per sum and row), B's FFN blocks
  took 58.4-61.8 ms in the sweep below.

  The defaults won a sweep on one H100 (2026-12-08, `docs/pending/ffn_block_variants.py`, B's 22
  FFN blocks forward + backward at batch 128, bf16): 52.5 ms against 61.0 for (2048, 4 warps,
  1 stage, all rows, per-row sums) and 63.6 for the taps VJP; rows=8 53.1-54.0, rows=4 59.4,
  8 warps 56.4, num_stages 2 54.0.

  bwd_num_warps: with BatchNorm's sums (`depthwise_backward(bn=...)`) the backward kernel at B's
  3x3 shapes needs 255 registers and spills 192 bytes with 4 warps, 195 registers and no
  spills with 8 (deviceless `ptxas -v`, sm_90a); not yet timed.

  fma (session 27, not yet timed): every multiply-add one PTX `fma.rn.f32` (`pallas_gpu.fma`;
  the kernels' `fma` argument), and rows
  outside the image masked in the loads' predicates instead of selected after them. PTX
  instructions per row and thread (deviceless, sm_90a, B's shapes): 3x3 backward 696 -> 462,
  3x3 forward 406 -> 300, 7x7 backward 2,097 -> 1,355 (spills 1,748 -> 1,116 bytes), 7x7
  forward 1,080 -> 778; with BatchNorm's sums 1,097 -> 812. Per row and thread the 3x3 kernels
  move 32 (forward) and 48 (backward) bytes of device memory, so they issued 12.7 and 14.5
  instructions per byte, above the ~8.8 at which an H100 SM's issue rate (128 lanes a cycle)
  matches its share of the memory bandwidth: instruction-bound; now 9.4 and 9.6.
  """

  tile_elements: int = 1024
  num_warps: int = 4
  num_stages: int = 1
  rows: int = 0
  bwd_num_warps: int = 0  # the backward kernel's warps (0: num_warps)
  fma: bool = True  # multiply-adds as PTX fma.rn.f32 (False: Triton's mul.rn + add.rn)


# Set by benchmarks to time another launch configuration (None: the defaults).
OVERRIDE: LaunchConfig | None = None


def launch_config() -> LaunchConfig:
  return OVERRIDE or LaunchConfig()


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def channel_block(channels: int, width_p: int, ksize: int, tile_elements: int = 2048) -> int:
  """Largest power of two dividing `channels`, capped so that a [Wp, block] tile is about
  `tile_elements` and the K*K accumulators [block] at most ACC_ELEMENTS."""
  block = channels & -channels  # lowest set bit: the largest power-of-two divisor
  cap = min(max(16, tile_elements // width_p), max(16, ACC_ELEMENTS // (ksize * ksize)))
  return max(1, min(block, _prev_pow2(cap)))


def _prev_pow2(n: int) -> int:
  return 1 << (n.bit_length() - 1)


def row_chunk(height: int, rows: int) -> int:
  """Rows a program walks: the largest divisor of `height` up to `rows` (0: all of them)."""
  if rows <= 0 or rows >= height:
    return height
  return max(d for d in range(1, rows + 1) if height % d == 0)


def _columns(width_p: int, shift: int, width: int, block: int) -> jax.Array:
  """[Wp, blk] bool: whether image column w + shift (w = 0 .. Wp - 1) lies in 0 .. W - 1."""
  source = jax.lax.broadcasted_iota(jnp.int32, (width_p, block), 0) + shift
  return (source >= 0) & (source < width)


def _load_row(ref, row, shift, *, width, width_p, col0, row_ok=None):
  """[Wp, blk] float32: image columns w + shift (w = 0 .. Wp - 1) of `row` of an image block
  whose column 0 is the ref's column col0; zero outside the image (masked: on the GPU the ref is
  the unpadded image and the masked lanes are not read). `row_ok` (a scalar bool): all zero
  where False (a row outside the image, whose clamped index `row` is read in bounds). Folded into
  the load's predicate (one per vector of a thread's channels), it costs less than a select of
  the tile after the load (deviceless PTX, B's 3x3 backward: 10 selects per element)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  mask = _columns(width_p, shift, width, ref.shape[-1])
  if row_ok is not None:
    mask = mask & row_ok
  tile = plgpu.load(ref.at[row, pl.ds(col0 + shift, width_p), :], mask=mask, other=0)
  return tile.astype(jnp.float32)


def _store_row(ref, row, value, *, width, width_p):
  """Stores the [Wp, blk] `value` at `row`, columns 0 .. W - 1 (the rest masked)."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plgpu

  mask = _columns(width_p, 0, width, ref.shape[-1])
  plgpu.store(ref.at[row, pl.ds(0, width_p), :], value.astype(ref.dtype), mask=mask)


def _depthwise_bwd_kernel(*refs, height, width, width_p, ksize, rows, col0, fma, bn):
  """x_ref, g_ref [H, W', blk] (x and g; image column c at column c + col0); with `bn` also
  z_ref [H, W', blk] (the input of the train-mode BatchNorm + GELU that gave x, before a bias)
  and, after k_ref [K*K, blk], p_ref [5, blk] (its mean, rstd, scale, bias and the input's
  bias) -> dx_ref [rows, W'', blk] (the program's rows), dk_ref [K*K + 1 (+ 2 with bn), blk]
  float32: the kernel-gradient partials of those rows, their bias-gradient partial (the sum of
  g), and with `bn` the partials of BatchNorm's two backward sums (of dz and dz * zhat, dz = dx
  as stored times GELU'), all accumulated as [Wp, blk] tiles and summed over W at the end."""
  from jax.experimental import pallas as pl

  if bn:
    x_ref, g_ref, z_ref, k_ref, p_ref, dx_ref, dk_ref = refs
  else:
    x_ref, g_ref, k_ref, dx_ref, dk_ref = refs
  f32 = jnp.float32
  pad = ksize // 2
  taps = ksize * ksize
  kern = [k_ref[t, :].astype(f32) for t in range(taps)]
  first = pl.program_id(2) * rows
  # A slice start known at trace time must lie in bounds (Pallas checks it); a masked tile may
  # start at -1 or end past W, so col0 is made a traced value (0 * a program id; Triton folds it).
  col0 = col0 + 0 * pl.program_id(0)
  load = functools.partial(_load_row, width=width, width_p=width_p, col0=col0)
  if bn:
    mean, rstd, scale, shift, z_bias = (p_ref[i, :][None, :] for i in range(5))
    valid = jax.lax.broadcasted_iota(jnp.int32, (width_p, 1), 0) < width

  def row(i, acc):
    h = first + i
    acc = list(acc)
    g_row = load(g_ref, h, 0)  # g[h, w]; zero for w >= W
    dx = None
    for di in range(ksize):
      # Rows outside the image: a clamped row's load, masked to zeros.
      r = h + di - pad  # x row that tap row di reads for output row h
      x_ok = (r >= 0) & (r < height)
      x_row = jnp.clip(r, 0, height - 1)
      q = h - di + pad  # g row whose tap row di reaches input row h
      g_ok = (q >= 0) & (q < height)
      g_row_q = jnp.clip(q, 0, height - 1)
      for dj in range(ksize):
        t = di * ksize + dj
        xs = load(x_ref, x_row, dj - pad, row_ok=x_ok)  # x[r, w + dj - p]
        acc[t] = pallas_gpu.fma(xs, g_row, acc[t], fma)
        gs = load(g_ref, g_row_q, pad - dj, row_ok=g_ok)  # g[q, w - dj + p]
        k_t = kern[t][None, :]
        dx = gs * k_t if dx is None else pallas_gpu.fma(gs, k_t, dx, fma)
    _store_row(dx_ref, i, dx, width=width, width_p=width_p)
    acc[taps] = acc[taps] + g_row
    if bn:  # BatchNorm's sums, from dx as stored (what its dz pass reads back)
      # z + its bias rounded to z's dtype (as XLA's add in that dtype), then normalised.
      z = (load(z_ref, h, 0) + z_bias).astype(z_ref.dtype).astype(f32)
      zhat = (z - mean) * rstd
      slope = gelu_grad_in_kernel(pallas_gpu.fma(zhat, scale, shift, fma), fma)
      dz = dx.astype(dx_ref.dtype).astype(f32) * slope
      dz = jnp.where(valid, dz, 0.0)  # columns >= W: dx there is not the image's
      acc[taps + 1] = acc[taps + 1] + dz
      acc[taps + 2] = pallas_gpu.fma(dz, zhat, acc[taps + 2], fma)
    return tuple(acc)

  zeros = jnp.zeros((width_p, *kern[0].shape), f32)
  sums = taps + (3 if bn else 1)
  acc = jax.lax.fori_loop(0, rows, row, (zeros,) * sums)
  for t in range(sums):
    dk_ref[t, :] = jnp.sum(acc[t], axis=0)


def _row_call(body, x, ksize, images, per_channel, partial_rows, interpret, num_warps=0):
  """Runs a kernel `body` on the grid (image, channel block, chunk of rows), each program walking
  its chunk's rows (`LaunchConfig.rows`) in [Wp, blk] tiles of a row (Wp = W rounded up to a
  power of two), with `num_warps` warps (0: `LaunchConfig.num_warps`).

  `images`: [B, H, W, C] inputs, whole images per program (it reads the rows around its chunk);
  `per_channel`: [R, C] inputs, whole rows of the program's channels. Returns the [B, H, W, C]
  map the kernel writes (in x's dtype) and its per-chunk partials [B, chunks, partial_rows, C]
  float32. On the GPU the kernels read and write the arrays as they are, masking the tiles'
  columns outside the image. The interpreter clamps an out-of-bounds slice instead of masking
  it, so there the images are zero-padded in W (column c at c + p) and the output is written at
  width Wp and sliced: the same kernel, every tile in bounds.
  """
  from jax.experimental import pallas as pl

  batch, height, width, channels = x.shape
  pad = ksize // 2
  width_p = _next_pow2(width)
  launch = launch_config()
  block = channel_block(channels, width_p, ksize, launch.tile_elements)
  rows = row_chunk(height, launch.rows)
  chunks = height // rows
  if interpret:
    col0, out_width = pad, width_p
    images = [jnp.pad(a, ((0, 0), (0, 0), (pad, width_p + pad - width), (0, 0))) for a in images]
  else:
    col0, out_width = 0, width
  image_spec = pl.BlockSpec((None, height, images[0].shape[2], block), lambda b, c, r: (b, 0, 0, c))
  kernel = functools.partial(
    body,
    height=height,
    width=width,
    width_p=width_p,
    ksize=ksize,
    rows=rows,
    col0=col0,
    fma=not interpret and launch.fma,
  )

  def call(*operands):  # on each device's images under a mesh (sharding.per_device)
    local = operands[0].shape[0]
    return pl.pallas_call(
      kernel,
      out_shape=(
        jax.ShapeDtypeStruct((local, height, out_width, channels), x.dtype),
        jax.ShapeDtypeStruct((local, chunks, partial_rows, channels), jnp.float32),
      ),
      grid=(local, channels // block, chunks),
      in_specs=[image_spec] * len(images)
      + [pl.BlockSpec((a.shape[0], block), lambda b, c, r: (0, c)) for a in per_channel],
      out_specs=(
        pl.BlockSpec((None, rows, out_width, block), lambda b, c, r: (b, r, 0, c)),
        pl.BlockSpec((None, None, partial_rows, block), lambda b, c, r: (b, r, 0, c)),
      ),
      compiler_params=None
      if interpret
      else pallas_gpu.compiler_params(num_warps or launch.num_warps, launch.num_stages),
      interpret=interpret,
    )(*operands)

  operands = (*(a.astype(x.dtype) for a in images), *per_channel)
  batched = [True] * len(images) + [False] * len(per_channel)
  out, partials = sharding.per_device(call, *operands, batched=batched)
  return out[:, :, :width, :], partials


def depthwise_backward(
  x: jax.Array,
  g: jax.Array,
  kernel: jax.Array,
  *,
  bn: tuple[jax.Array, jax.Array] | None = None,
  interpret: bool = False,
) -> tuple[jax.Array, ...]:
  """Gradients of y = correlate(x, kernel) + bias (stride 1, zero padding K//2, NHWC).

  Args:
    x: [B, H, W, C] the conv's input.
    g: [B, H, W, C] the gradient of its output.
    kernel: [K, K, C], K odd.
    bn: where x = GELU(BatchNorm(z + b)) in train mode: (z [B, H, W, C], [5, C] float32: the
      batch mean, rstd = rsqrt(var + eps), scale and bias, and b); the kernel then also gives
      BatchNorm's backward sums, reading z once (`ops.bn_gelu_depthwise_train`).
    interpret: run in the Pallas interpreter (any backend; for tests).
  Returns:
    (dx [B, H, W, C] in x's dtype, dkernel [K, K, C] float32, dbias [C] float32), and with `bn`
    the sums over pixels of dz and dz * zhat [C] float32, where zhat = (z + b - mean) * rstd
    (z + b rounded to z's dtype) and dz = dx (rounded to x's dtype) * GELU'(zhat * scale + bias).
  """
  ksize, channels = kernel.shape[0], x.shape[-1]
  taps = kernel.reshape(ksize * ksize, channels)
  images, per_channel = (x, g), (taps,)
  if bn is not None:
    images, per_channel = (x, g, bn[0]), (taps, bn[1].astype(jnp.float32))
  body = functools.partial(_depthwise_bwd_kernel, bn=bn is not None)
  partial_rows = ksize * ksize + (3 if bn is not None else 1)
  warps = launch_config().bwd_num_warps
  dx, dk = _row_call(body, x, ksize, images, per_channel, partial_rows, interpret, warps)
  sums = dk.sum(axis=(0, 1))
  dkernel = sums[: ksize * ksize].reshape(ksize, ksize, channels)
  out = (dx, dkernel, sums[ksize * ksize])
  return out if bn is None else (*out, sums[-2], sums[-1])


def _depthwise_fwd_kernel(
  x_ref, k_ref, b_ref, y_ref, stats_ref, *, height, width, width_p, ksize, rows, col0, fma
):
  """x_ref [H, W', blk] (image column c at column c + col0), k_ref [K*K, blk], b_ref [1, blk]
  -> y_ref [rows, W'', blk] (the program's rows) and stats_ref [2, blk]: the mean and sum of
  squared deviations of y over those rows' pixels (float32, with the accuracy of a two-pass
  variance: Welford's update per column over the rows, then the columns merged with Chan's
  formula)."""
  from jax.experimental import pallas as pl

  f32 = jnp.float32
  pad = ksize // 2
  kern = [k_ref[t, :].astype(f32) for t in range(ksize * ksize)]
  bias = b_ref[0, :].astype(y_ref.dtype).astype(f32)
  valid = jax.lax.broadcasted_iota(jnp.int32, (width_p, 1), 0) < width
  first = pl.program_id(2) * rows
  # A slice start known at trace time must lie in bounds (Pallas checks it); a masked tile may
  # start at -1 or end past W, so col0 is made a traced value (0 * a program id; Triton folds it).
  col0 = col0 + 0 * pl.program_id(0)
  load = functools.partial(_load_row, width=width, width_p=width_p, col0=col0)

  def row(i, carry):
    h = first + i
    mean, m2 = carry
    acc = None
    for di in range(ksize):
      r = h + di - pad
      ok = (r >= 0) & (r < height)
      x_row = jnp.clip(r, 0, height - 1)
      for dj in range(ksize):
        xs, k_t = load(x_ref, x_row, dj - pad, row_ok=ok), kern[di * ksize + dj][None, :]
        acc = xs * k_t if acc is None else pallas_gpu.fma(xs, k_t, acc, fma)
    # As ops.depthwise_conv's taps: the bias added in float32, one rounding.
    y = (acc + bias[None, :]).astype(y_ref.dtype)
    _store_row(y_ref, i, y, width=width, width_p=width_p)
    # Welford per column; columns >= W hold the bias only: they leave in the merge below.
    delta = y.astype(f32) - mean
    mean = pallas_gpu.fma(delta, 1.0 / (i + 1).astype(f32), mean, fma)
    m2 = pallas_gpu.fma(delta, y.astype(f32) - mean, m2, fma)
    return mean, m2

  zeros = jnp.zeros((width_p, *bias.shape), f32)
  column_mean, column_m2 = jax.lax.fori_loop(0, rows, row, (zeros, zeros))
  # Chan's merge of the W columns' moments (each over `rows` pixels).
  mean = jnp.sum(jnp.where(valid, column_mean, 0.0), axis=0) / width
  spread = jnp.where(valid, jnp.square(column_mean - mean[None, :]), 0.0)
  m2 = jnp.sum(jnp.where(valid, column_m2, 0.0), axis=0) + rows * jnp.sum(spread, axis=0)
  stats_ref[0, :] = mean
  stats_ref[1, :] = m2


def depthwise_forward(
  x: jax.Array, kernel: jax.Array, bias: jax.Array, *, interpret: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """y = correlate(x, kernel) + bias (stride 1, zero padding K//2, NHWC), and y's batch moments.

  Args:
    x: [B, H, W, C].
    kernel: [K, K, C], K odd.
    bias: [C].
    interpret: run in the Pallas interpreter (any backend; for tests).
  Returns:
    (y [B, H, W, C] in x's dtype, mean [C], biased variance [C]), the moments float32 over
    (B, H, W) of y as stored: what train-mode BatchNorm computes from y.
  """
  batch, height, width, channels = x.shape
  ksize = kernel.shape[0]
  per_channel = (kernel.reshape(ksize * ksize, channels), bias.reshape(1, channels))
  y, stats = _row_call(_depthwise_fwd_kernel, x, ksize, (x,), per_channel, 2, interpret)
  # Merge the programs' moments (each over the same number of pixels) with Chan's formula.
  part_mean, part_m2 = stats[:, :, 0].reshape(-1, channels), stats[:, :, 1].reshape(-1, channels)
  mean = part_mean.mean(axis=0)
  pixels = batch * height * width // part_mean.shape[0]
  m2 = part_m2.sum(axis=0) + pixels * jnp.square(part_mean - mean).sum(axis=0)
  return y, mean, m2 / (batch * height * width)


@functools.cache
def available() -> bool:
  """Whether the kernels compile and run on the default backend (a GPU); False, with one logged
  line, on other backends or if Pallas's Triton backend fails (callers then use the XLA
  formulation)."""
  if jax.default_backend() != 'gpu':
    return False
  return pallas_gpu.probe(run_each_kernel, 'Pallas depthwise conv', "the XLA formulation ('taps')")


def run_each_kernel(interpret: bool = False) -> None:
  """Compiles and runs every kernel here on tiny inputs (the probe). Callers may be tracing (the
  first model that asks traces under jit): nothing here may apply an op to the results."""
  x = np.ones((1, 4, 4, 16), np.float32)
  k, b = x[0, :3, :3], x[0, 0, 0]
  params = np.ones((4, 16), np.float32)
  for fn, args in [
    (depthwise_forward, (x, k, b)),
    (depthwise_backward, (x, x, k)),
    (depthwise_bn_gelu, (x, k, params)),
  ]:
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    compiled = jax.jit(functools.partial(fn, interpret=interpret)).lower(*specs).compile()
    jax.block_until_ready(compiled(*args))


# ---------------------------------------------------------------------------------------------
# Inference: the Mlp's depthwise conv with the following BatchNorm (running statistics) and GELU
# ---------------------------------------------------------------------------------------------
# Why: in B's eval step the unfused form writes the conv's output and reads it back for mid_norm
# + GELU (8 of the step's 50 GB moved, deviceless compile for an H100). Fused, the step moves
# 42.8 GB and peaks 0.43 GiB lower, but this kernel is slower than cuDNN's conv plus XLA's pass
# at each of B's stage shapes (H200, batch 256, bf16, docs/pending/eval_conv_tiles.py: 1.31 /
# 0.68 / 0.54 / 0.33 ms against 0.96 / 0.64 / 0.40 / 0.28 ms; 0.63 TB/s at 56x56x256), so it is
# opt-in (depthwise_impl 'pallas'); every tile shape tried was slower.
# Phi(z) = 1 - Q(|z|) for z >= 0 and Q(|z|) below, Q(a) = erfc(a / sqrt 2) / 2, with
# erfc(u) ~ t (c1 + t (c2 + ... + t c5)) exp(-u^2), t = 1 / (1 + p u): Abramowitz & Stegun
# 7.1.26, |error| < 1.5e-7 on erf. Pallas's Triton lowering has no erf; this needs one exp and
# one division, and has no cancellation for z < 0 (the tail is computed directly).
_ERFC_P = 0.3275911
_ERFC_C = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _phi_and_pdf(z: jax.Array, in_ptx: bool = False) -> tuple[jax.Array, jax.Array]:
  """The standard normal CDF Phi(z) (to 1e-7) and density of a float32 array (`in_ptx`: its
  multiply-adds as PTX fma, inside a GPU kernel: `pallas_gpu.fma`)."""
  u = jnp.abs(z) * np.float32(1.0 / np.sqrt(2.0))
  t = 1.0 / (1.0 + _ERFC_P * u)
  poly = jnp.full_like(t, _ERFC_C[-1])
  for c in reversed(_ERFC_C[:-1]):
    poly = pallas_gpu.fma(t, poly, jnp.full_like(t, c), in_ptx)
  gauss = jnp.exp(-u * u)  # exp(-z^2 / 2)
  tail = 0.5 * t * poly * gauss  # Q(|z|) = P(Z > |z|)
  return jnp.where(z >= 0, 1.0 - tail, tail), gauss * np.float32(1.0 / np.sqrt(2.0 * np.pi))


def gelu_in_kernel(z: jax.Array, in_ptx: bool = False) -> jax.Array:
  """Exact GELU z * Phi(z) of a float32 array, to 1e-7 of Phi, from ops Triton lowers."""
  return z * _phi_and_pdf(z, in_ptx)[0]


def gelu_grad_in_kernel(z: jax.Array, in_ptx: bool = False) -> jax.Array:
  """GELU'(z) = Phi(z) + z * pdf(z) of a float32 array (as `ops._activation_grad`), from one
  exp and one division."""
  phi, pdf = _phi_and_pdf(z, in_ptx)
  return pallas_gpu.fma(z, pdf, phi, in_ptx)


def _pow2_divisor(n: int) -> int:
  return n & -n


def eval_tiles(
  hw: int, channels: int, tile_elements: int = 2048, max_pixels: int = 64
) -> tuple[int, int]:
  """(pixels, channels) of a program's tile in `depthwise_bn_gelu`: pixels a power of two
  dividing H*W (at most `max_pixels`), so that the flattened image splits into whole tiles;
  channels a power of two dividing C, up to 256 and about `tile_elements` / pixels."""
  pixels = min(_pow2_divisor(hw), max_pixels)
  block = min(_pow2_divisor(channels), max(16, tile_elements // pixels), 256)
  return pixels, block


def _depthwise_eval_kernel(xp_ref, k_ref, p_ref, y_ref, *, width, ksize, pixels, steps, fma):
  """xp_ref [H*W + 2f, blk]: x flattened over (H, W) with f = p*W + p zero pixels before and
  after (so every tap's load is in bounds, and rows outside the image read zeros); k_ref
  [K*K, blk]; p_ref [4, blk] float32: conv bias, BatchNorm's running mean, scale * rsqrt(var +
  eps) and bias -> y_ref [H*W, blk] = GELU(BatchNorm(conv(x) + bias)). A program walks its image
  in tiles of `pixels` consecutive pixels; taps that cross a row's end are masked by column.
  `fma`: multiply-adds as PTX fma (`pallas_gpu.fma`)."""
  from jax.experimental import pallas as pl

  f32 = jnp.float32
  pad = ksize // 2
  front = pad * width + pad
  kern = [k_ref[t, :].astype(f32)[None, :] for t in range(ksize * ksize)]
  # As the unfused path: the bias rounded to the compute dtype, added in float32, one rounding.
  bias = p_ref[0, :].astype(y_ref.dtype).astype(f32)[None, :]
  mean, mul, shift = (p_ref[i, :][None, :] for i in (1, 2, 3))
  offsets = jax.lax.broadcasted_iota(jnp.int32, (pixels, 1), 0)

  def tile(i, carry):
    start = i * pixels
    column = (start + offsets) % width
    acc = None
    for dj in range(ksize):
      part = None
      for di in range(ksize):
        xs = xp_ref[pl.ds(start + front + (di - pad) * width + dj - pad, pixels), :].astype(f32)
        k_t = kern[di * ksize + dj]
        part = xs * k_t if part is None else pallas_gpu.fma(xs, k_t, part, fma)
      source = column + (dj - pad)  # the column these taps read
      part = jnp.where((source >= 0) & (source < width), part, 0.0)
      acc = part if acc is None else acc + part
    y = (acc + bias).astype(y_ref.dtype).astype(f32)
    z = pallas_gpu.fma(y - mean, mul, shift, fma)
    y_ref[pl.ds(start, pixels), :] = gelu_in_kernel(z, fma).astype(y_ref.dtype)
    return carry

  jax.lax.fori_loop(0, steps, tile, 0)


def depthwise_bn_gelu(
  x: jax.Array,
  kernel: jax.Array,
  params: jax.Array,
  *,
  interpret: bool = False,
  tile_elements: int = 2048,
  max_pixels: int = 64,
  num_warps: int = 4,
  num_stages: int = 1,
) -> jax.Array:
  """GELU((correlate(x, kernel) + bias - mean) * mul + shift) in one pass (inference).

  Args:
    x: [B, H, W, C].
    kernel: [K, K, C], K odd.
    params: [4, C] float32: the conv's bias, then BatchNorm's running mean, scale * rsqrt(var +
      eps) and bias.
    interpret: run in the Pallas interpreter (any backend; for tests).
    tile_elements, max_pixels: a program's tile (`eval_tiles`); num_warps, num_stages: Triton's
      launch parameters (`pallas_gpu.compiler_params`), for sweeps.
  Returns:
    [B, H, W, C] in x's dtype: the conv's output rounded to x's dtype, then BatchNorm and GELU
    in float32, rounded once.
  """
  from jax.experimental import pallas as pl

  batch, height, width, channels = x.shape
  ksize = kernel.shape[0]
  hw = height * width
  front = (ksize // 2) * (width + 1)
  pixels, block = eval_tiles(hw, channels, tile_elements, max_pixels)
  flat = jnp.pad(x.reshape(batch, hw, channels), ((0, 0), (front, front), (0, 0)))

  def call(flat, taps, params):  # on each device's images under a mesh (sharding.per_device)
    return pl.pallas_call(
      functools.partial(
        _depthwise_eval_kernel,
        width=width,
        ksize=ksize,
        pixels=pixels,
        steps=hw // pixels,
        fma=not interpret and launch_config().fma,
      ),
      out_shape=jax.ShapeDtypeStruct((flat.shape[0], hw, channels), x.dtype),
      grid=(flat.shape[0], channels // block),
      in_specs=[
        pl.BlockSpec((None, hw + 2 * front, block), lambda b, c: (b, 0, c)),
        pl.BlockSpec((ksize * ksize, block), lambda b, c: (0, c)),
        pl.BlockSpec((4, block), lambda b, c: (0, c)),
      ],
      out_specs=pl.BlockSpec((None, hw, block), lambda b, c: (b, 0, c)),
      compiler_params=None if interpret else pallas_gpu.compiler_params(num_warps, num_stages),
      interpret=interpret,
    )(flat, taps, params)

  operands = (flat, kernel.reshape(ksize * ksize, channels), params.astype(jnp.float32))
  y = sharding.per_device(call, *operands, batched=(True, False, False))
  return y.reshape(batch, height, width, channels)
