"""Fast formulations of the network's memory-bound ops: depthwise convolution and train-mode
BatchNorm (with an optional fused activation).

Every function here computes the same numbers as the plain formulation (up to float rounding
order); the golden tests run through them. Why each exists (measured on one H200, see
docs/../notes and the README speed table):
- cuDNN picks a slow grouped-direct kernel for some depthwise shapes: the Mlp's 3x3 depthwise
  conv at 28x28x512 (stage 2 of B) took 2.8 ms forward and 2.9 ms backward per block at batch
  128 in bfloat16, 23 ms of a 92 ms step. `impl='taps'` writes the conv as K*K shifted
  multiply-adds (one fused elementwise pass) with a hand-written VJP: the input gradient is the
  same pass over the output gradient with the flipped kernel, the kernel gradient one fused
  reduction. All three are memory-bound single passes.
- Autodiff of BatchNorm's two-pass statistics gives several reduction passes and keeps float32
  copies of the activations for the backward pass. `batch_norm_train` has a hand-written VJP: it
  keeps only the (bfloat16) input, and the backward is one fused two-sum reduction plus one
  elementwise pass, with the activation (GELU/ReLU) recomputed inside it.
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

DepthwiseImpl = Literal['auto', 'taps', 'xla', 'matmul', 'pallas']
Activation = Literal['none', 'relu', 'gelu']


# ---------------------------------------------------------------------------------------------
# Depthwise convolution
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=32)
def _tap_selection(height: int, width: int, kernel: int) -> np.ndarray:
  """One-hot [HW, HW, k*k]: S[p, q, t] = 1 where input q reaches output p through tap t
  (stride 1, symmetric zero padding k//2, cross-correlation as torch/lax conv)."""
  pad = kernel // 2
  positions = height * width
  sel = np.zeros((positions, positions, kernel * kernel), np.float32)
  for pi in range(height):
    for pj in range(width):
      for di in range(kernel):
        for dj in range(kernel):
          qi, qj = pi + di - pad, pj + dj - pad
          if 0 <= qi < height and 0 <= qj < width:
            sel[pi * width + pj, qi * width + qj, di * kernel + dj] = 1.0
  sel.setflags(write=False)
  return sel


def _depthwise_as_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """y[b, p, c] = sum_q T[p, q, c] x[b, q, c] with T built from the taps (exact selection)."""
  batch, height, width, channels = x.shape
  k = kernel.shape[0]
  sel = jnp.asarray(_tap_selection(height, width, k), kernel.dtype)
  taps = kernel.reshape(k * k, channels)
  # One nonzero product per entry: exact in any precision of the operands.
  matrix = jnp.einsum('pqt,tc->cpq', sel, taps, precision=jax.lax.Precision.HIGHEST)
  tokens = x.reshape(batch, height * width, channels)
  y = jnp.einsum('cpq,bqc->bpc', matrix.astype(x.dtype), tokens)
  return y.reshape(batch, height, width, channels)


def _shifted(xp: jax.Array, di: int, dj: int, height: int, width: int) -> jax.Array:
  rows = jax.lax.slice_in_dim(xp, di, di + height, axis=1)
  return jax.lax.slice_in_dim(rows, dj, dj + width, axis=2)


def _taps_correlate(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
  """sum_t shift_t(pad(x)) * kernel[t] (+ bias) with float32 accumulation, rounded once to x's
  dtype (as cuDNN adds a bias in PyTorch's autocast); x [B, H, W, C], kernel [K, K, C], bias
  [C]. Cross-correlation with zero padding K//2 (as lax.conv / torch)."""
  _, height, width, _ = x.shape
  k = kernel.shape[0]
  pad = k // 2
  # Each input element is read K*K times: keep XLA from fusing (and so recomputing K*K times)
  # an expensive producer such as BatchNorm + exact GELU into this pass.
  x = jax.lax.optimization_barrier(x)
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  w = kernel.astype(jnp.float32)
  acc = None
  for di in range(k):
    for dj in range(k):
      term = _shifted(xp, di, dj, height, width).astype(jnp.float32) * w[di, dj]
      acc = term if acc is None else acc + term
  if bias is not None:
    acc = acc + bias.astype(x.dtype).astype(jnp.float32)
  return acc.astype(x.dtype)


@jax.custom_vjp
def _depthwise_taps(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  return _taps_correlate(x, kernel, bias)


def _depthwise_taps_fwd(x, kernel, bias):
  # In training, BatchNorm reads y three times (mean, variance, normalise): behind the barrier y
  # is written once in x's dtype. Without it XLA wrote the float32 accumulator from the first
  # pass and rounded it in each reader (deviceless, B's stage-1 block: 1.85 -> 1.24 GB moved).
  # (Inference runs the primal above: one reader, into which the taps fuse.)
  y = jax.lax.optimization_barrier(_taps_correlate(x, kernel, bias))
  return y, (x, kernel, bias)


def _depthwise_taps_bwd(residuals, g):
  x, kernel, bias = residuals
  x, g = jax.lax.optimization_barrier((x, g))  # see _taps_correlate
  _, height, width, _ = x.shape
  k = kernel.shape[0]
  pad = k // 2
  # d/dx of a correlation is the correlation of g with the flipped kernel.
  # Materialised in x's dtype behind a barrier: its consumers (BatchNorm's backward, two passes)
  # would otherwise make XLA write the float32 accumulator and round it in each reader (B's
  # stage 1: 411 MB written and read twice instead of 206 MB).
  dx = jax.lax.optimization_barrier(_taps_correlate(g.astype(x.dtype), kernel[::-1, ::-1]))
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  g32 = g.astype(jnp.float32)
  # dkernel[t, c] = sum_{b,h,w} shift_t(pad(x)) * g: K*K sibling reductions over the same two
  # operands, which XLA splits into 5-6 reduction kernels (each reads x and g). One reduction
  # over the stacked [K*K + 1, ...] products reads them once (deviceless, B's stage-1 block:
  # 2.48 -> 0.83 GB moved) but ran slower on an H100 (B's train step 81.7 -> 84.3 ms,
  # 2026-12-07): its single kernel computes ten products per element.
  dkernel = jnp.stack(
    [
      jnp.sum(_shifted(xp, di, dj, height, width).astype(jnp.float32) * g32, axis=(0, 1, 2))
      for di in range(k)
      for dj in range(k)
    ]
  ).reshape(kernel.shape)
  # The bias gradient summed in float32 (autodiff of a bfloat16 bias add sums in bfloat16: 8%
  # off at 28x28x256, batch 2), a sibling of the reductions above.
  dbias = jnp.sum(g32, axis=(0, 1, 2))
  return dx, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_depthwise_taps.defvjp(_depthwise_taps_fwd, _depthwise_taps_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _depthwise_pallas(x, kernel, bias, interpret):
  from vcmamba_jax.models import depthwise_pallas

  return depthwise_pallas.depthwise_forward(x, kernel, bias, interpret=interpret)


def _depthwise_pallas_fwd(x, kernel, bias, interpret):
  return _depthwise_pallas(x, kernel, bias, interpret), (x, kernel, bias)


def _depthwise_pallas_bwd(interpret, residuals, cotangents):
  from vcmamba_jax.models import depthwise_pallas

  x, kernel, bias = residuals
  g = cotangents[0]  # the moments leave through stop_gradient (depthwise_conv_with_moments)
  dx, dkernel, dbias = depthwise_pallas.depthwise_backward(x, g, kernel, interpret=interpret)
  return dx, dkernel.astype(kernel.dtype), dbias.astype(bias.dtype)


_depthwise_pallas.defvjp(_depthwise_pallas_fwd, _depthwise_pallas_bwd)


def depthwise_conv_with_moments(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  *,
  impl: DepthwiseImpl = 'auto',
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
  """``depthwise_conv`` and, where the implementation gives them for free, the batch mean and
  biased variance of its output (float32, over all axes but the last), else None.

  impl 'pallas' computes them in the conv's own pass (a following train-mode BatchNorm then
  skips its two statistics passes: ``batch_norm_train(..., moments=...)``). They leave through
  ``stop_gradient``: BatchNorm's VJP already carries the gradient through its statistics.
  """
  check_depthwise_kernel(kernel)
  impl = _resolve_depthwise_impl(impl)
  if impl != 'pallas':
    return depthwise_conv(x, kernel, bias, impl=impl), None
  return _pallas_with_moments(x, kernel, bias)


def _pallas_with_moments(x, kernel, bias):
  """impl 'pallas' of a checked [K, K, 1, C] kernel: (y, stop_gradient moments)."""
  interpret = jax.default_backend() != 'gpu'
  y, mean, var = _depthwise_pallas(x, kernel.astype(x.dtype)[:, :, 0, :], bias, interpret)
  return y, (jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var))


def depthwise_conv_bn_gelu(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array,
  affine: tuple[jax.Array, jax.Array, jax.Array],
  *,
  impl: DepthwiseImpl = 'auto',
) -> jax.Array:
  """Inference: GELU(BatchNorm(depthwise_conv(x) + bias)) with BatchNorm's running statistics,
  ``affine`` = (mean, mul, shift) as ``batch_norm_eval`` takes them.

  impl 'pallas': one Pallas kernel (models/depthwise_pallas.py, ``depthwise_bn_gelu``) that
  reads x once and writes the activated output once, where the unfused formulation writes and
  reads back the conv's output; gradients (an eval-mode saliency map, say) through the unfused
  formulation. Other impls: ``depthwise_conv`` then ``batch_norm_eval``. Returns x's dtype.
  """
  check_depthwise_kernel(kernel)
  impl = _resolve_depthwise_impl(impl)
  if impl != 'pallas':
    return _depthwise_bn_gelu_unfused(x, kernel, bias, affine, impl)
  interpret = jax.default_backend() != 'gpu'
  return _depthwise_bn_gelu_pallas(x, kernel, bias, tuple(affine), interpret)


def batch_norm_eval(
  x: jax.Array,
  mean: jax.Array,
  mul: jax.Array,
  shift: jax.Array,
  activation: Activation,
  dtype=None,
) -> jax.Array:
  """BatchNorm with running statistics, ``mul`` = scale * rsqrt(var + eps), in float32, then
  the activation, rounded once to ``dtype`` (default x's)."""
  y = activate((x.astype(jnp.float32) - mean) * mul + shift, activation)
  return y.astype(dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _depthwise_bn_gelu_pallas(x, kernel, bias, affine, interpret):
  from vcmamba_jax.models import depthwise_pallas

  params = jnp.stack([bias.astype(jnp.float32), *(a.astype(jnp.float32) for a in affine)])
  k = kernel.astype(x.dtype)[:, :, 0, :]
  return depthwise_pallas.depthwise_bn_gelu(x, k, params, interpret=interpret)


def _depthwise_bn_gelu_unfused(x, kernel, bias, affine, impl='taps'):
  return batch_norm_eval(depthwise_conv(x, kernel, bias, impl=impl), *affine, 'gelu')


def _depthwise_bn_gelu_pallas_fwd(x, kernel, bias, affine, interpret):
  return _depthwise_bn_gelu_pallas(x, kernel, bias, affine, interpret), (x, kernel, bias, affine)


def _depthwise_bn_gelu_pallas_bwd(interpret, residuals, g):
  del interpret
  return jax.vjp(_depthwise_bn_gelu_unfused, *residuals)[1](g)


_depthwise_bn_gelu_pallas.defvjp(_depthwise_bn_gelu_pallas_fwd, _depthwise_bn_gelu_pallas_bwd)


def check_depthwise_kernel(kernel: jax.Array) -> None:
  if kernel.ndim != 4 or kernel.shape[2] != 1 or kernel.shape[0] % 2 != 1:
    raise ValueError(f'expected a [K, K, 1, C] depthwise kernel with K odd, got {kernel.shape}')


def training_depthwise_impl() -> DepthwiseImpl:
  """What DepthwiseConv's 'auto' runs in training: 'pallas' on GPUs (its kernels fall back to
  'taps' with a logged line where Pallas's Triton backend fails), 'taps' elsewhere (on the CPU
  'pallas' would run the interpreter; TPUs have no such kernel). B, bf16, batch 128, one H100
  (2026-12-08, same machine): train step 72.0 ms with 'pallas', 81.3 ms with 'taps'."""
  return 'pallas' if jax.default_backend() == 'gpu' else 'taps'


def _resolve_depthwise_impl(impl: DepthwiseImpl) -> DepthwiseImpl:
  """'auto' -> 'taps'; 'pallas' -> 'taps' on a GPU where Pallas's Triton backend fails (one
  logged line); elsewhere 'pallas' runs the Pallas interpreter (tests)."""
  if impl == 'auto':
    return 'taps'
  if impl == 'pallas' and jax.default_backend() == 'gpu':
    from vcmamba_jax.models import depthwise_pallas

    return 'pallas' if depthwise_pallas.available() else 'taps'
  return impl


def depthwise_conv(
  x: jax.Array,
  kernel: jax.Array,
  bias: jax.Array | None = None,
  *,
  impl: DepthwiseImpl = 'auto',
) -> jax.Array:
  """Depthwise KxK convolution, stride 1, padding K//2 (as torch Conv2d(groups=C)), NHWC.

  Args:
    x: [B, H, W, C] in the compute dtype.
    kernel: [K, K, 1, C] (flax's layout of a depthwise conv kernel), K odd.
    bias: optional [C].
    impl: 'taps' (K*K shifted multiply-adds, hand-written VJP; float32 accumulation),
      'xla' (lax.conv_general_dilated: cuDNN on GPUs), 'matmul' (a per-channel [HW, HW] matrix;
      small grids only), 'pallas' (forward and backward each one Pallas kernel,
      models/depthwise_pallas.py: on GPUs, else the Pallas interpreter; falls back to 'taps' with
      a logged line where Pallas's Triton backend fails), 'auto' = 'taps'.
  Returns:
    [B, H, W, C] in x's dtype.
  """
  check_depthwise_kernel(kernel)
  channels = x.shape[-1]
  impl = _resolve_depthwise_impl(impl)
  if bias is None and impl in ('taps', 'pallas'):
    bias = jnp.zeros((channels,), jnp.float32)
  if impl == 'pallas':
    return _pallas_with_moments(x, kernel, bias)[0]
  kernel = kernel.astype(x.dtype)
  if impl == 'taps':
    return _depthwise_taps(x, kernel[:, :, 0, :], bias)
  if impl == 'matmul':
    y = _depthwise_as_matmul(x, kernel[:, :, 0, :])
  elif impl == 'xla':
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1, 1),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=channels,
    )
  else:
    raise ValueError(
      f"depthwise impl must be 'auto', 'taps', 'xla', 'matmul' or 'pallas', got {impl!r}"
    )
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y


# ---------------------------------------------------------------------------------------------
# BatchNorm (train mode) with a fused activation
# ---------------------------------------------------------------------------------------------
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def gelu(z: jax.Array) -> jax.Array:
  """Exact GELU written as torch computes it, z/2 * (1 + erf(z/sqrt(2))).

  ``jax.nn.gelu(approximate=False)`` uses erfc, which XLA expands into erf plus an exp-based
  branch: about twice the arithmetic of erf alone in a pass that is otherwise memory-bound.
  """
  return 0.5 * z * (1.0 + jax.lax.erf(z * _SQRT_HALF))


def activate(z: jax.Array, activation: Activation) -> jax.Array:
  """'none' | 'relu' | 'gelu' (exact erf, as torch.nn.GELU())."""
  if activation == 'none':
    return z
  if activation == 'relu':
    return jax.nn.relu(z)
  if activation == 'gelu':
    return gelu(z)
  raise ValueError(f"activation must be 'none', 'relu' or 'gelu', got {activation!r}")


def _activation_grad(z: jax.Array, activation: Activation) -> jax.Array:
  """d act(z) / dz (float32)."""
  if activation == 'none':
    return jnp.ones_like(z)
  if activation == 'relu':
    return (z > 0).astype(z.dtype)
  cdf = 0.5 * (1.0 + jax.lax.erf(z * _SQRT_HALF))
  pdf = jnp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2.0 * math.pi))
  return cdf + z * pdf


def batch_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Batch mean and biased variance over all axes but the last, float32: what train-mode
  BatchNorm computes (and takes as its ``moments`` argument).

  One pass over x: the sums of d and d^2 for d = x - s, where s is x's first sample of each
  channel, so |mean - s| is of the order of the standard deviation and E[d^2] - E[d]^2 does not
  cancel (an unshifted E[x^2] - E[x]^2 loses every digit where |mean| >> std). Stacked into one
  reduction, XLA reads x once instead of twice (mean, then squared deviations): deviceless for
  an H100, B's train step at batch 128 moves ~5 GB less of ~103 GB.
  """
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  shift = jax.lax.stop_gradient(xf[(0,) * len(axes)])
  d = xf - shift
  m1, m2 = jnp.mean(jnp.stack([d, jnp.square(d)]), axis=tuple(a + 1 for a in axes))
  return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


def batch_norm_train(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  epsilon: float,
  activation: Activation,
  moments: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Train-mode BatchNorm over all axes but the last, then `activation`.

  Args:
    x: [..., C] activations (any float dtype; statistics in float32).
    scale, bias: [C] float32 affine parameters.
    epsilon: added to the variance.
    activation: 'none' | 'relu' | 'gelu' (exact erf GELU), applied after the affine.
    moments: x's batch mean and biased variance [C] float32 where the producer of x computed
      them in its own pass (``depthwise_conv_with_moments``), else None (computed here by
      ``batch_moments``, one pass). Given moments must be those of x: the VJP differentiates
      through them as such.
  Returns:
    (y in x's dtype, batch mean [C], biased batch variance [C]); mean/var float32.
  """
  if moments is None:
    return _batch_norm_train(x, scale, bias, epsilon, activation)
  mean, var = (jax.lax.stop_gradient(m) for m in moments)
  return _batch_norm_given_moments(x, scale, bias, mean, var, epsilon, activation), mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, activation):
  y, mean, var, _ = _bn_forward(x, scale, bias, epsilon, activation)
  return y, mean, var


def _bn_forward(x, scale, bias, epsilon, activation, moments=None):
  mean, var = batch_moments(x) if moments is None else moments
  rstd = jax.lax.rsqrt(var + epsilon)
  z = (x.astype(jnp.float32) - mean) * (scale * rstd) + bias
  return activate(z, activation).astype(x.dtype), mean, var, rstd


# Whether train-mode BatchNorm's backward sums run as a Pallas kernel on GPUs
# (`batchnorm_pallas.backward_sums`; on other backends in the interpreter, for tests) instead of
# XLA's column reduction. Off until timed on a GPU; benchmarks set it
# (docs/pending/run_with_kernel_config.py --pallas_bn_sums).
PALLAS_BN_SUMS = False


def _pallas_bn_sums(x, dy, mean, rstd, scale, bias, activation):
  """(dbias, dscale) of `_bn_backward` from the Pallas kernel, or None where it is unavailable
  on this GPU (one logged line; XLA then reduces)."""
  from vcmamba_jax.models import batchnorm_pallas

  interpret = jax.default_backend() != 'gpu'
  if not interpret and not batchnorm_pallas.available():
    return None
  return batchnorm_pallas.backward_sums(
    x, dy, mean, rstd, scale, bias, activation, interpret=interpret
  )


def _bn_fwd(x, scale, bias, epsilon, activation):
  y, mean, var, rstd = _bn_forward(x, scale, bias, epsilon, activation)
  return (y, mean, var), (x, scale, bias, mean, rstd)


def _bn_backward(activation, residuals, dy, sums=None):
  """dx, dscale, dbias, xhat of y = act(BN(x)), the batch statistics' dependence on x included.
  ``sums``: (dbias, dscale), the two sums over pixels, where another kernel computed them
  (`bn_gelu_depthwise_train`); then this is one elementwise pass."""
  x, scale, bias, mean, rstd = residuals
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])

  def normalized_and_dz(x):
    xhat = (x.astype(jnp.float32) - mean) * rstd
    dz = dy.astype(jnp.float32)
    if activation != 'none':
      dz = dz * _activation_grad(xhat * scale + bias, activation)
    return xhat, dz

  if sums is None and PALLAS_BN_SUMS:
    sums = _pallas_bn_sums(x, dy, mean, rstd, scale, bias, activation)
  if sums is None:
    xhat, dz = normalized_and_dz(x)
    # One pass over (dy, x): both sums come out of one multi-output reduction fusion.
    dbias = jnp.sum(dz, axis=axes)
    dscale = jnp.sum(dz * xhat, axis=axes)
    if activation == 'gelu':
      # XLA does not recompute an erf/exp in two kernels: given one dz, it writes dz in float32
      # from the reduction and reads it back in the dx pass (3.3 GB a step in B's stages 1-2 at
      # batch 128). Behind the barrier, the dx pass derives its own dz from (dy, x).
      xhat, dz = normalized_and_dz(jax.lax.optimization_barrier(x))
  else:
    dbias, dscale = sums
    xhat, dz = normalized_and_dz(x)
  dx = (scale * rstd) * (dz - (dbias + xhat * dscale) / count)
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype), xhat


def _bn_bwd(epsilon, activation, residuals, cotangents):
  del epsilon
  x, _, _, _, rstd = residuals
  dy, dmean, dvar = cotangents
  dx, dscale, dbias, xhat = _bn_backward(activation, residuals, dy)
  # The statistics are outputs too (running averages); their cotangents are zero in training,
  # kept for exactness if someone differentiates through them.
  count = math.prod(x.shape[:-1])
  dx = dx + dmean / count + dvar * (2.0 / count) * (xhat / rstd)
  return dx.astype(x.dtype), dscale, dbias


_batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _batch_norm_given_moments(x, scale, bias, mean, var, epsilon, activation):
  return _bn_forward(x, scale, bias, epsilon, activation, (mean, var))[0]


def _bn_given_fwd(x, scale, bias, mean, var, epsilon, activation):
  y, _, _, rstd = _bn_forward(x, scale, bias, epsilon, activation, (mean, var))
  return y, (x, scale, bias, mean, rstd)


def _bn_given_bwd(epsilon, activation, residuals, dy):
  del epsilon
  x, _, _, mean, rstd = residuals
  dx, dscale, dbias, _ = _bn_backward(activation, residuals, dy)
  # The moments are those of x: dx above already holds their dependence on it.
  return dx.astype(x.dtype), dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(rstd)


_batch_norm_given_moments.defvjp(_bn_given_fwd, _bn_given_bwd)


# ---------------------------------------------------------------------------------------------
# Train-mode BatchNorm + GELU, then the depthwise conv (the conv Mlp's middle)
# ---------------------------------------------------------------------------------------------
class TrainBatchNorm(NamedTuple):
  """A train-mode BatchNorm (+ activation) that a following op applies itself: its affine
  parameters [C] float32, its input's batch ``moments`` (mean, biased variance [C] float32),
  its epsilon and activation; ``input_bias`` [C]: where the op is given a matmul's output
  before its bias, the bias (BatchNorm's input is their sum in the op's dtype); ``save_name``:
  the remat tag of the activated output (None: untagged)."""

  scale: jax.Array
  bias: jax.Array
  moments: tuple[jax.Array, jax.Array]
  epsilon: float
  activation: Activation
  input_bias: jax.Array | None = None
  save_name: str | None = None


# Whether impl 'pallas' of `bn_gelu_depthwise_train` sums BatchNorm's gradients in the conv's
# backward kernel. Off until timed on a GPU (deviceless for an H100, B's train step at batch 128:
# 95.1 -> 90.7 GB moved, 2,565 -> 2,433 kernels, the same memory; docs/pending/README.md);
# benchmarks set it (docs/pending/run_with_kernel_config.py --fuse_bn_backward).
FUSE_BN_BACKWARD = False


def bn_gelu_depthwise_train(
  z: jax.Array,
  bn: TrainBatchNorm,
  kernel: jax.Array,
  conv_bias: jax.Array,
  *,
  impl: DepthwiseImpl = 'auto',
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Training: y = depthwise_conv(GELU(BatchNorm(z + bn.input_bias))), BatchNorm with the
  batch moments in ``bn`` (as ``batch_norm_train(..., moments=...)`` takes them), and y's
  moments where the conv's implementation gives them (``depthwise_conv_with_moments``).

  impl 'pallas' with FUSE_BN_BACKWARD: the conv's backward kernel also computes BatchNorm's
  two backward sums (it reads z once more and adds the input bias itself;
  `depthwise_pallas.depthwise_backward(bn=...)`), so that BatchNorm's backward is one
  elementwise pass instead of a reduction over (dx, z) and that pass, and z + bias is never
  written. Otherwise ``batch_norm_train`` then ``depthwise_conv_with_moments``.
  ``bn.save_name``: the activation (the conv's input) is tagged with it for a remat policy.
  Same numbers either way.
  """
  check_depthwise_kernel(kernel)
  if bn.activation != 'gelu':
    raise ValueError(
      f"bn_gelu_depthwise_train: the BatchNorm's activation must be 'gelu', got {bn.activation!r}"
    )
  impl = _resolve_depthwise_impl(impl)
  mean, var = (jax.lax.stop_gradient(m) for m in bn.moments)
  input_bias = bn.input_bias
  if input_bias is None:
    input_bias = jnp.zeros(z.shape[-1:], jnp.float32)
  if impl != 'pallas' or not FUSE_BN_BACKWARD:
    z = z + input_bias.astype(z.dtype)
    x = _batch_norm_given_moments(z, bn.scale, bn.bias, mean, var, bn.epsilon, 'gelu')
    if bn.save_name is not None:
      x = checkpoint_name(x, bn.save_name)
    return depthwise_conv_with_moments(x, kernel, conv_bias, impl=impl)
  interpret = jax.default_backend() != 'gpu'
  taps = kernel.astype(z.dtype)[:, :, 0, :]
  y, y_mean, y_var = _bn_gelu_depthwise_pallas(
    z,
    input_bias,
    bn.scale,
    bn.bias,
    mean,
    var,
    taps,
    conv_bias,
    bn.epsilon,
    bn.save_name,
    interpret,
  )
  return y, (jax.lax.stop_gradient(y_mean), jax.lax.stop_gradient(y_var))


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _bn_gelu_depthwise_pallas(*args):
  return _bn_gelu_depthwise_fwd(*args)[0]


def _bn_gelu_depthwise_fwd(
  z, input_bias, scale, bias, mean, var, taps, conv_bias, epsilon, save_name, interpret
):
  from vcmamba_jax.models import depthwise_pallas

  biased = z + input_bias.astype(z.dtype)  # read where the activation is computed
  x, _, _, rstd = _bn_forward(biased, scale, bias, epsilon, 'gelu', (mean, var))
  if save_name is not None:  # a remat policy that saves this name keeps x for the backward
    x = checkpoint_name(x, save_name)
  out = depthwise_pallas.depthwise_forward(x, taps, conv_bias, interpret=interpret)
  return out, (z, input_bias, scale, bias, mean, rstd, x, taps, conv_bias)


def _bn_gelu_depthwise_bwd(epsilon, save_name, interpret, residuals, cotangents):
  from vcmamba_jax.models import depthwise_pallas

  del epsilon, save_name
  z, input_bias, scale, bias, mean, rstd, x, taps, conv_bias = residuals
  g = cotangents[0]  # y's moments leave through stop_gradient (bn_gelu_depthwise_train)
  params = jnp.stack([mean, rstd, scale, bias, input_bias.astype(z.dtype).astype(jnp.float32)])
  dx, dtaps, dconv_bias, dbias, dscale = depthwise_pallas.depthwise_backward(
    x, g, taps, bn=(z, params), interpret=interpret
  )
  bn_residuals = (z + input_bias.astype(z.dtype), scale, bias, mean, rstd)
  dz, dscale, dbias, _ = _bn_backward('gelu', bn_residuals, dx, sums=(dbias, dscale))
  axes = tuple(range(z.ndim - 1))
  # z's moments are its own: dz above already holds their dependence on z.
  return (
    dz.astype(z.dtype),
    jnp.sum(dz, axis=axes).astype(input_bias.dtype),  # a sibling of the dz pass
    dscale.astype(scale.dtype),
    dbias.astype(bias.dtype),
    jnp.zeros_like(mean),
    jnp.zeros_like(rstd),
    dtaps.astype(taps.dtype),
    dconv_bias.astype(conv_bias.dtype),
  )


_bn_gelu_depthwise_pallas.defvjp(_bn_gelu_depthwise_fwd, _bn_gelu_depthwise_bwd)
