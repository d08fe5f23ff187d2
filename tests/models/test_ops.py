"""The fast formulations in models/ops.py against the plain ones (CPU, float32, exact bounds)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcmamba_jax.models import batchnorm_pallas, depthwise_pallas, ops, pallas_gpu


def _value_and_grads(fn, args):
  """fn(*args) and the gradients of sum(fn * w) (w random), in one jitted program."""
  weight = jax.random.normal(jax.random.key(7), jax.eval_shape(fn, *args).shape)

  def both(*a):
    grads = jax.grad(lambda *b: jnp.sum(fn(*b) * weight), argnums=tuple(range(len(a))))(*a)
    return fn(*a), grads

  return jax.jit(both)(*args)


@pytest.mark.parametrize(
  'impl,kernel,height,width',
  [
    ('taps', 3, 9, 10),
    ('taps', 7, 7, 7),
    ('taps', 7, 2, 3),
    ('matmul', 3, 5, 8),
    # The Pallas backward kernel, in the interpreter: non-square, a grid smaller than the kernel.
    ('pallas', 3, 9, 10),
    ('pallas', 7, 7, 7),
    ('pallas', 7, 2, 3),
  ],
)
def test_depthwise_conv_matches_lax_conv(impl, kernel, height, width):
  keys = jax.random.split(jax.random.key(kernel * 100 + height), 3)
  x = jax.random.normal(keys[0], (2, height, width, 6))
  w = jax.random.normal(keys[1], (kernel, kernel, 1, 6))
  b = jax.random.normal(keys[2], (6,))
  _assert_matches_lax_conv(impl, x, w, b)


def _assert_matches_lax_conv(impl, x, w, b):
  """`impl`'s output and gradients against XLA's convolution; returns XLA's output."""
  with jax.default_matmul_precision('highest'):
    fast = lambda x, w, b: ops.depthwise_conv(x, w, b, impl=impl)
    ref = lambda x, w, b: ops.depthwise_conv(x, w, b, impl='xla')
    y_fast, g_fast = _value_and_grads(fast, (x, w, b))
    y_ref, g_ref = _value_and_grads(ref, (x, w, b))
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  for name, a, r in zip(['x', 'kernel', 'bias'], g_fast, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4, err_msg=name)
  return y_ref


@pytest.mark.parametrize('rows', [3, 2, 0])
def test_pallas_depthwise_kernels_split_the_rows_among_programs(monkeypatch, rows):
  """`LaunchConfig.rows`: programs own chunks of 3 (or 2, or all) of the 9 (or 10) rows; the
  output, the moments and every gradient as with the XLA conv (the chunks' partials merged)."""
  monkeypatch.setattr(depthwise_pallas, 'OVERRIDE', depthwise_pallas.LaunchConfig(rows=rows))
  height = 9 if rows == 3 else 10
  keys = jax.random.split(jax.random.key(rows), 3)
  x = jax.random.normal(keys[0], (2, height, 10, 16)) * 2 + 1
  w = jax.random.normal(keys[1], (3, 3, 1, 16))
  b = jax.random.normal(keys[2], (16,)) + 3
  y_ref = _assert_matches_lax_conv('pallas', x, w, b)
  _, (mean, var) = ops.depthwise_conv_with_moments(x, w, b, impl='pallas')
  ref_mean, ref_var = ops.batch_moments(y_ref)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)


@pytest.mark.parametrize('kernel,grid,channels', [(3, 56, 256), (7, 7, 1024)])
def test_pallas_depthwise_kernels_lower_to_triton_at_the_b_shapes(kernel, grid, channels):
  # No GPU here: a CUDA cross-lowering runs Pallas's Triton lowering (power-of-two tiles, ops
  # that Triton has), which the interpreter does not. The Mlp's 3x3 of stage 1 and the mixer's
  # 7x7 at batch 128: the forward (with the moments) and the backward kernel (also with
  # BatchNorm's sums), the inference kernel, and BatchNorm's backward sums alone.
  x = jax.ShapeDtypeStruct((128, grid, grid, channels), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((kernel, kernel, channels), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((channels,), jnp.float32)
  p, p5 = (jax.ShapeDtypeStruct((rows, channels), jnp.float32) for rows in (4, 5))
  for fn, args in [
    (lambda x, k, b: depthwise_pallas.depthwise_forward(x, k, b), (x, k, b)),
    (lambda x, g, k: depthwise_pallas.depthwise_backward(x, g, k), (x, x, k)),
    (lambda x, g, k, p: depthwise_pallas.depthwise_backward(x, g, k, bn=(x, p)), (x, x, k, p5)),
    (lambda x, k, p: depthwise_pallas.depthwise_bn_gelu(x, k, p), (x, k, p)),
    (lambda x, g, b: batchnorm_pallas.backward_sums(x, g, b, b, b, b, 'gelu'), (x, x, b)),
  ]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    assert text.count('custom_call @__gpu$xla.gpu.triton') == 1


@pytest.mark.parametrize('fma', [True, False])
def test_pallas_depthwise_kernels_multiply_add_in_one_ptx_instruction(monkeypatch, fma):
  """On the GPU the kernels' multiply-adds are inline `fma.rn.f32` (Triton rounds a product and
  a sum separately; the interpreter cannot run PTX, so this checks the CUDA lowering), unless
  `LaunchConfig(fma=False)`."""
  monkeypatch.setattr(depthwise_pallas, 'OVERRIDE', depthwise_pallas.LaunchConfig(fma=fma))
  monkeypatch.setattr(pallas_gpu, 'ptx_fma_works', lambda: True)  # its GPU check, passed
  x = jax.ShapeDtypeStruct((8, 14, 14, 64), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((3, 3, 64), jnp.bfloat16)
  b = jax.ShapeDtypeStruct((64,), jnp.float32)
  for fn, args in [
    (lambda x, k, b: depthwise_pallas.depthwise_forward(x, k, b), (x, k, b)),
    (lambda x, g, k: depthwise_pallas.depthwise_backward(x, g, k), (x, x, k)),
  ]:
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    assert ('fma.rn.f32' in text) == fma


def test_inline_fma_is_used_only_where_its_check_passes(monkeypatch, caplog):
  """`pallas_gpu.ptx_fma_works`: False on the CPU; where its kernel fails (here: a 'GPU' whose
  Pallas cannot compile for Triton) False with one logged line, and `fma` then multiplies and
  adds."""
  assert not pallas_gpu.ptx_fma_works()
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  pallas_gpu.ptx_fma_works.cache_clear()
  try:
    with caplog.at_level('WARNING'):
      assert not pallas_gpu.ptx_fma_works()
      a = jnp.float32(3.0)
      assert float(pallas_gpu.fma(a, a, a, in_ptx=True)) == 12.0
  finally:
    pallas_gpu.ptx_fma_works.cache_clear()
  assert sum('inline PTX fma is unavailable' in r.getMessage() for r in caplog.records) == 1


def test_batch_moments_one_pass_keeps_the_variance_where_the_mean_dwarfs_it():
  """One pass, yet a two-pass variance: channels with |mean| / std of 0, 1e2 and 1e4 (an
  unshifted E[x^2] - E[x]^2 in float32 returns noise for the last two)."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((4, 9, 11, 3)) * np.array([1.0, 0.5, 2.0]) + np.array([0.0, 50.0, 2e4])
  mean, var = jax.jit(ops.batch_moments)(jnp.asarray(x, jnp.float32))
  x32 = x.astype(np.float32).astype(np.float64)  # the values the op sees
  np.testing.assert_allclose(mean, x32.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(var, x32.var(axis=(0, 1, 2)), rtol=2e-4)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_pallas_depthwise_forward_gives_the_moments_batch_norm_would_compute(dtype):
  # W = 10 pads to 16 columns: the padding must not enter the statistics.
  keys = jax.random.split(jax.random.key(5), 3)
  x = (jax.random.normal(keys[0], (3, 9, 10, 16)) * 2 + 1).astype(dtype)
  w = jax.random.normal(keys[1], (3, 3, 1, 16))
  b = jax.random.normal(keys[2], (16,)) + 3  # a mean far from 0 tests the variance's accuracy
  y, (mean, var) = jax.jit(lambda x, w, b: ops.depthwise_conv_with_moments(x, w, b, impl='pallas'))(
    x, w, b
  )
  y_taps = ops.depthwise_conv(x, w, b, impl='taps')
  np.testing.assert_allclose(
    y.astype(jnp.float32), y_taps.astype(jnp.float32), rtol=1e-6, atol=1e-5
  )
  ref_mean, ref_var = ops.batch_moments(y)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(var, ref_var, rtol=1e-5)
  assert ops.depthwise_conv_with_moments(x, w, b, impl='taps')[1] is None


@pytest.mark.parametrize('fuse_bn_backward', [False, True])
def test_mlp_with_the_pallas_depthwise_trains_as_with_taps(monkeypatch, fuse_bn_backward):
  """The FFN with impl 'pallas' (Pallas conv forward and backward, its moments replacing
  mid_norm's statistics passes; with `ops.FUSE_BN_BACKWARD` also norm1's backward sums) against
  'taps': output, every gradient and the running stats."""
  from vcmamba_jax.models.layers import Mlp

  monkeypatch.setattr(ops, 'FUSE_BN_BACKWARD', fuse_bn_backward)

  x = jax.random.normal(jax.random.key(1), (2, 6, 7, 8))
  variables = Mlp(16).init(jax.random.key(0), x, train=False)

  def run(impl):
    def loss(params):
      y, updates = Mlp(16, depthwise_impl=impl).apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(y * jnp.cos(y)), (y, updates)

    (_, (y, updates)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
    return y, updates, grads

  with jax.default_matmul_precision('highest'):
    got, want = run('pallas'), run('taps')
  for name, a, r in zip(['output', 'batch_stats', 'grads'], got, want):
    # The biases of fc1, mid and fc2 feed a BatchNorm: their exact gradient is 0, what both
    # compute is float noise, so the absolute bound scales with the largest value of the tree.
    atol = 1e-6 * max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(r))
    jax.tree.map(
      lambda a, r, name=name, atol=atol: np.testing.assert_allclose(
        a, r, rtol=1e-5, atol=atol, err_msg=name
      ),
      a,
      r,
    )


@pytest.fixture
def fused_bn_backward(monkeypatch):
  monkeypatch.setattr(ops, 'FUSE_BN_BACKWARD', True)


@pytest.mark.usefixtures('fused_bn_backward')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_bn_gelu_depthwise_sums_batch_norms_gradients_in_the_conv_backward(dtype):
  """impl 'pallas' of the Mlp's middle (norm1's sums from the conv's backward kernel, then one
  elementwise pass) against 'taps' (BatchNorm's own VJP, then the taps conv): output, moments
  and the gradients of z, BatchNorm's scale and bias, the kernel and the conv's bias. W = 10
  pads to 16 columns (masked out of the sums); z's mean is far from 0; in bfloat16 the sums
  must see dx as stored, as the elementwise pass does. z is a matmul's output before its
  bias (`input_bias`), which both add in z's dtype."""
  keys = jax.random.split(jax.random.key(11), 6)
  z = (jax.random.normal(keys[0], (2, 9, 10, 16)) * 2 + 3).astype(dtype)
  scale = 1 + 0.3 * jax.random.normal(keys[1], (16,))
  bias = 0.5 * jax.random.normal(keys[2], (16,))
  w = jax.random.normal(keys[3], (3, 3, 1, 16))
  b = jax.random.normal(keys[4], (16,))
  z_bias = 0.5 * jax.random.normal(keys[5], (16,))

  def fn(impl):
    def run(z, z_bias, scale, bias, w, b):
      moments = ops.batch_moments(z + z_bias.astype(z.dtype))
      bn = ops.TrainBatchNorm(scale, bias, moments, 1e-5, 'gelu', input_bias=z_bias)
      return ops.bn_gelu_depthwise_train(z, bn, w, b, impl=impl)[0].astype(jnp.float32)

    return run

  args = (z, z_bias, scale, bias, w, b)
  got_y, got = _value_and_grads(fn('pallas'), args)
  want_y, want = _value_and_grads(fn('taps'), args)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(got_y, want_y, rtol=tol, atol=tol)
  # The input bias feeds BatchNorm: its exact gradient is 0 and both compute float noise, so
  # the absolute bound scales with the largest gradient.
  atol = tol * max(float(jnp.abs(r.astype(jnp.float32)).max()) for r in want)
  names = ['z', 'input bias', 'scale', 'bias', 'kernel', 'conv bias']
  for name, a, r in zip(names, got, want):
    a, r = a.astype(jnp.float32), r.astype(jnp.float32)
    np.testing.assert_allclose(a, r, rtol=tol, atol=atol, err_msg=name)
  biased = z + z_bias.astype(dtype)
  mean, var = ops.batch_moments(biased)
  bn = ops.TrainBatchNorm(scale, bias, (mean, var), 1e-5, 'gelu', input_bias=z_bias)
  _, moments = ops.bn_gelu_depthwise_train(z, bn, w, b, impl='pallas')
  ref = ops.batch_moments(
    ops.depthwise_conv(
      ops.batch_norm_train(biased, scale, bias, 1e-5, 'gelu', (mean, var))[0], w, b, impl='taps'
    )
  )
  for a, r in zip(moments, ref):
    np.testing.assert_allclose(a, r, rtol=max(tol, 1e-5), atol=1e-5)
  with pytest.raises(ValueError, match="activation must be 'gelu'"):
    ops.bn_gelu_depthwise_train(z, bn._replace(activation='relu'), w, b, impl='pallas')


def test_pallas_depthwise_backwards_bn_sums_are_batch_norms_sums():
  """The backward kernel's two BatchNorm sums, exactly what `_bn_backward` sums (float32)."""
  keys = jax.random.split(jax.random.key(12), 4)
  x, g, z = (jax.random.normal(k, (2, 7, 10, 16)) for k in keys[:3])
  k = jax.random.normal(keys[3], (3, 3, 16))
  mean, rstd = jnp.full((16,), 0.2), jnp.full((16,), 1.5)
  scale, bias = jnp.linspace(0.5, 1.5, 16), jnp.linspace(-1, 1, 16)
  z_bias = jnp.linspace(-0.3, 0.4, 16)
  params = jnp.stack([mean, rstd, scale, bias, z_bias])
  dx, _, _, dbias, dscale = depthwise_pallas.depthwise_backward(
    x, g, k, bn=(z, params), interpret=True
  )
  zhat = (z + z_bias - mean) * rstd
  dz = dx * ops._activation_grad(zhat * scale + bias, 'gelu')
  np.testing.assert_allclose(dbias, dz.sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(dscale, (dz * zhat).sum((0, 1, 2)), rtol=1e-5, atol=1e-4)
  dx_plain = depthwise_pallas.depthwise_backward(x, g, k, interpret=True)[0]
  np.testing.assert_array_equal(dx, dx_plain)


@pytest.mark.usefixtures('fused_bn_backward')
def test_mlp_under_remat_keeps_what_it_kept_before_the_fused_backward():
  """FFNBlock with remat_mlp 'fc2_input' (the default): 'pallas' (norm1 inside the conv's custom
  VJP) saves the same residuals as 'taps' (its conv input among them), trains to the same
  gradients; with 'all', one hidden-width residual fewer in both."""
  from vcmamba_jax.models.layers import FFNBlock

  x = jax.random.normal(jax.random.key(1), (2, 6, 7, 8))
  variables = FFNBlock(mlp_ratio=2.0).init(jax.random.key(0), x, train=False)

  def loss(impl, remat, params):
    y, _ = FFNBlock(mlp_ratio=2.0, depthwise_impl=impl, remat_mlp=remat).apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    return jnp.sum(y * jnp.cos(y))

  def hidden_residuals(impl, remat):  # what the backward pass keeps: the VJP's closure
    vjp = lambda p: jax.vjp(functools.partial(loss, impl, remat), p)[1]
    kept = jax.tree.leaves(jax.eval_shape(vjp, variables['params']))
    return sorted(str(a.dtype) for a in kept if a.shape == (2, 6, 7, 16))

  for remat in ('fc2_input', 'all'):
    assert hidden_residuals('pallas', remat) == hidden_residuals('taps', remat)
  assert len(hidden_residuals('taps', 'fc2_input')) == len(hidden_residuals('taps', 'all')) + 1
  with jax.default_matmul_precision('highest'):
    got, want = (
      jax.jit(jax.grad(functools.partial(loss, impl, 'fc2_input')))(variables['params'])
      for impl in ('pallas', 'taps')
    )
  atol = 1e-5 * max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(want))
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=atol), got, want)


@pytest.mark.parametrize('activation', ['none', 'relu', 'gelu'])
def test_pallas_batch_norm_sums_are_the_backward_sums(activation):
  """`batchnorm_pallas.backward_sums` (interpreter) against the sums `_bn_backward` takes, with
  a row count that leaves the last tile partly masked (2 * 5 * 7 = 70 rows of 32-row tiles)."""
  keys = jax.random.split(jax.random.key(13), 2)
  x = jax.random.normal(keys[0], (2, 5, 7, 48)) * 2 + 1
  dy = jax.random.normal(keys[1], x.shape)
  mean, rstd = jnp.full((48,), 0.7), jnp.full((48,), 0.4)
  scale, bias = jnp.linspace(0.5, 1.5, 48), jnp.linspace(-1.0, 1.0, 48)
  got = batchnorm_pallas.backward_sums(x, dy, mean, rstd, scale, bias, activation, interpret=True)
  xhat = (x - mean) * rstd
  dz = dy * ops._activation_grad(xhat * scale + bias, activation)
  for a, want in zip(got, (dz.sum((0, 1, 2)), (dz * xhat).sum((0, 1, 2)))):
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_batch_norm_train_with_the_pallas_sums_trains_as_with_xla(monkeypatch):
  """`ops.PALLAS_BN_SUMS`: the Mlp's BatchNorms take their backward sums from the Pallas kernel
  (interpreter here); every gradient as with XLA's reduction."""
  from vcmamba_jax.models.layers import Mlp

  x = jax.random.normal(jax.random.key(1), (2, 6, 7, 8))
  variables = Mlp(16).init(jax.random.key(0), x, train=False)

  def grads(pallas_sums):
    monkeypatch.setattr(ops, 'PALLAS_BN_SUMS', pallas_sums)

    def loss(params):
      y, _ = Mlp(16, depthwise_impl='taps', remat='fc2_input').apply(
        {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
      )
      return jnp.sum(y * jnp.cos(y))

    return jax.jit(jax.grad(loss))(variables['params'])

  with jax.default_matmul_precision('highest'):
    got, want = grads(True), grads(False)
  atol = 1e-5 * max(float(jnp.abs(leaf).max()) for leaf in jax.tree.leaves(want))
  jax.tree.map(lambda a, r: np.testing.assert_allclose(a, r, rtol=1e-4, atol=atol), got, want)


def test_the_pallas_depthwise_probe_runs_while_a_model_is_being_traced():
  # The first model that asks `depthwise_pallas.available()` asks while jit traces it: the probe
  # must not apply ops to its results (an index into a result became a tracer, the probe failed
  # on the GPU and every 'pallas' conv fell back to 'taps').
  jax.jit(lambda y: (depthwise_pallas.run_each_kernel(interpret=True), y)[1])(1.0)


@pytest.mark.parametrize(
  'kernel,height,width,channels', [(3, 9, 10, 48), (3, 7, 7, 32), (3, 8, 8, 16), (7, 2, 3, 8)]
)
def test_fused_eval_conv_matches_the_unfused_ops(kernel, height, width, channels):
  """depthwise conv + mid_norm (running statistics) + GELU in one Pallas kernel (interpreter)
  against `depthwise_conv` then `batch_norm_eval`: float32 to rounding, gradients through the
  unfused formula, on grids of 90, 49 (odd), 64 and 6 pixels (a 7x7 kernel larger than the
  grid): tiles of 2, 1, 64 and 2 pixels, and the masks of taps that cross a row's end.
  """
  keys = jax.random.split(jax.random.key(height * width + kernel), 6)
  x = jax.random.normal(keys[0], (2, height, width, channels))
  w = jax.random.normal(keys[1], (kernel, kernel, 1, channels)) * 0.3
  b = jax.random.normal(keys[2], (channels,))
  affine = (
    jax.random.normal(keys[3], (channels,)) * 0.3,
    1 + 0.2 * jax.random.normal(keys[4], (channels,)),
    0.1 * jax.random.normal(keys[5], (channels,)),
  )
  fused = lambda x, w, b: ops.depthwise_conv_bn_gelu(x, w, b, affine, impl='pallas')
  unfused = lambda x, w, b: ops.batch_norm_eval(
    ops.depthwise_conv(x, w, b, impl='xla'), *affine, 'gelu'
  )
  with jax.default_matmul_precision('highest'):
    y_fast, g_fast = _value_and_grads(fused, (x, w, b))
    y_ref, g_ref = _value_and_grads(unfused, (x, w, b))
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=2e-6)
  for name, a, r in zip(['x', 'kernel', 'bias'], g_fast, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-4, err_msg=name)


def test_the_kernels_gelu_is_exact_gelu_to_float32_rounding():
  z = jnp.linspace(-12.0, 12.0, 100_001)
  got, want = depthwise_pallas.gelu_in_kernel(z), jax.nn.gelu(z, approximate=False)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  # Phi itself to the formula's 1.5e-7 plus float32 rounding (GELU's error is that times |z|).
  nonzero = jnp.where(z == 0, 1.0, z)
  np.testing.assert_allclose(got / nonzero, want / nonzero, rtol=0, atol=4e-7)


def test_mlp_inference_with_the_fused_conv_computes_the_unfused_mlp():
  """Mlp in inference: impl 'pallas' (conv, mid_norm and GELU in one kernel, its parameters
  read through `BatchNorm.eval_affine`) against 'xla' (the unfused layers), with non-trivial
  running statistics."""
  from vcmamba_jax.models.layers import Mlp

  x = jax.random.normal(jax.random.key(1), (2, 6, 7, 8))
  variables = Mlp(16).init(jax.random.key(0), x, train=False)
  noise = lambda a: a + 0.1 * jax.random.normal(jax.random.key(a.size), a.shape)
  variables = jax.tree.map(noise, variables)
  with jax.default_matmul_precision('highest'):
    got, want = (
      jax.jit(lambda v, x, impl=impl: Mlp(16, depthwise_impl=impl).apply(v, x, train=False))(
        variables, x
      )
      for impl in ('pallas', 'xla')
    )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(want).max()) > 0.1


def test_depthwise_conv_rejects_a_dense_kernel():
  with pytest.raises(ValueError, match='depthwise kernel'):
    ops.depthwise_conv(jnp.zeros((1, 4, 4, 3)), jnp.zeros((3, 3, 3, 3)))


@pytest.mark.parametrize('activation', ['none', 'relu', 'gelu'])
def test_batch_norm_train_matches_autodiff_of_the_formula(activation):
  keys = jax.random.split(jax.random.key(3), 3)
  x = jax.random.normal(keys[0], (4, 5, 6, 8)) * 3 + 1
  scale = 1 + 0.3 * jax.random.normal(keys[1], (8,))
  bias = 0.3 * jax.random.normal(keys[2], (8,))

  def plain(x, scale, bias):
    mean = x.mean((0, 1, 2))
    var = jnp.square(x - mean).mean((0, 1, 2))
    return ops.activate((x - mean) * scale * jax.lax.rsqrt(var + 1e-5) + bias, activation)

  fast = lambda x, s, b: ops.batch_norm_train(x, s, b, 1e-5, activation)[0]
  y_fast, g_fast = _value_and_grads(fast, (x, scale, bias))
  y_ref, g_ref = _value_and_grads(plain, (x, scale, bias))
  np.testing.assert_allclose(y_fast, y_ref, rtol=1e-5, atol=1e-5)
  for name, a, r in zip(['x', 'scale', 'bias'], g_fast, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-4, atol=1e-5, err_msg=name)
  # Statistics (for the running averages): mean and biased variance, float32.
  _, mean, var = ops.batch_norm_train(x, scale, bias, 1e-5, activation)
  np.testing.assert_allclose(mean, x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, x.var((0, 1, 2)), rtol=1e-5)


def test_gelu_matches_the_exact_erf_gelu():
  """torch's formula in float32: within 1e-6 of the float64 GELU everywhere (absolute: for
  z << 0, 1 + erf cancels, as in torch) and within 2e-6 relative for z >= -1."""
  z = np.linspace(-12.0, 12.0, 20001, dtype=np.float32)
  exact = np.array([0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z.astype(np.float64)])
  got = np.asarray(ops.gelu(jnp.asarray(z)), np.float64)
  assert np.abs(got - exact).max() <= 1e-6
  upper = z >= -1
  np.testing.assert_allclose(got[upper], exact[upper], rtol=2e-6, atol=1e-7)


def test_auto_trains_with_the_pallas_kernels_on_gpus_only(monkeypatch):
  # B on one H100 (2026-12-08): 72.0 ms a train step with 'pallas', 81.3 ms with 'taps'. On the
  # CPU 'pallas' would run the interpreter, and TPUs have no such kernel.
  assert ops.training_depthwise_impl() == 'taps'
  for backend, impl in (('gpu', 'pallas'), ('tpu', 'taps')):
    monkeypatch.setattr(jax, 'default_backend', lambda backend=backend: backend)
    assert ops.training_depthwise_impl() == impl
