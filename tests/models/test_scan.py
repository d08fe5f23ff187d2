"""The selective scan: associative vs sequential reference, and the zig-zag scan tables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import golden
from vcmamba_jax.models import scan as scan_lib


def _inputs(key, lead=(2,), length=13, inner=8, state=4):
  ks = jax.random.split(key, 7)
  u = jax.random.normal(ks[0], lead + (length, inner))
  delta = jax.random.normal(ks[1], lead + (length, inner))
  A = -jnp.exp(jax.random.normal(ks[2], (inner, state)))
  B = jax.random.normal(ks[3], lead + (length, state))
  C = jax.random.normal(ks[4], lead + (length, state))
  D = jax.random.normal(ks[5], (inner,))
  bias = jax.random.normal(ks[6], (inner,))
  return u, delta, A, B, C, D, bias


def _numpy_reference(u, delta, A, B, C, D, bias):
  """float64 loop straight from the mamba_ssm definition (single leading axis)."""
  u, delta, A, B, C, D, bias = (np.asarray(x, np.float64) for x in (u, delta, A, B, C, D, bias))
  delta = np.log1p(np.exp(delta + bias))
  out = np.zeros_like(u)
  for b in range(u.shape[0]):
    h = np.zeros(A.shape)
    for t in range(u.shape[1]):
      h = np.exp(delta[b, t][:, None] * A) * h + (delta[b, t] * u[b, t])[:, None] * B[b, t]
      out[b, t] = h @ C[b, t] + D * u[b, t]
  return out


@pytest.mark.parametrize('length', [1, 2, 7, 49, 50])
def test_associative_matches_sequential_and_float64(length):
  args = _inputs(jax.random.key(length), length=length)
  assoc = scan_lib.selective_scan(*args, impl='associative')
  seq = scan_lib.selective_scan(*args, impl='sequential')
  ref = _numpy_reference(*args)
  np.testing.assert_allclose(assoc, seq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(assoc, ref, rtol=1e-4, atol=1e-4)


def test_gradients_agree_and_remat_is_exact():
  args = _inputs(jax.random.key(3), length=20)
  weights = jax.random.normal(jax.random.key(4), args[0].shape)

  def loss(fn, impl):
    return lambda *a: jnp.sum(fn(*a, impl=impl) * weights)

  argnums = tuple(range(7))
  g_assoc = jax.grad(loss(scan_lib.selective_scan, 'associative'), argnums)(*args)
  g_seq = jax.grad(loss(scan_lib.selective_scan, 'sequential'), argnums)(*args)
  g_remat = jax.grad(loss(scan_lib.selective_scan_remat, 'associative'), argnums)(*args)
  for a, s, r in zip(g_assoc, g_seq, g_remat):
    scale = float(jnp.abs(s).max())
    assert float(jnp.abs(a - s).max()) <= 1e-4 * scale
    np.testing.assert_array_equal(a, r)


def test_broadcast_directions_equal_explicit_copies():
  """delta/C shared by 4 scans (size-1 axis) == the same values repeated explicitly."""
  u, delta, A, B, C, D, bias = _inputs(jax.random.key(5), lead=(2, 4))
  shared = scan_lib.selective_scan(u, delta[:, :1], A, B, C[:, :1], D, bias)
  copied = scan_lib.selective_scan(
    u, jnp.repeat(delta[:, :1], 4, 1), A, B, jnp.repeat(C[:, :1], 4, 1), D, bias
  )
  np.testing.assert_allclose(shared, copied, rtol=1e-6, atol=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
  args = _inputs(jax.random.key(6), length=49)
  u16 = args[0].astype(jnp.bfloat16)
  y = scan_lib.selective_scan(u16, *args[1:])
  assert y.dtype == jnp.bfloat16
  ref = scan_lib.selective_scan(u16.astype(jnp.float32), *args[1:])
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=1e-2, atol=1e-2)


def test_softplus_threshold_matches_pytorch():
  x = jnp.array([-30.0, -1.0, 0.0, 1.0, 19.9, 20.0, 20.5, 80.0])
  expected = np.where(np.asarray(x) > 20, np.asarray(x), np.log1p(np.exp(np.asarray(x))))
  np.testing.assert_allclose(scan_lib.softplus(x), expected, rtol=1e-6)
  assert np.isfinite(np.asarray(scan_lib.softplus(jnp.array([1e4])))).all()


def test_unknown_impl_is_an_error():
  with pytest.raises(ValueError, match='unknown scan impl'):
    scan_lib.selective_scan(*_inputs(jax.random.key(0)), impl='cuda')


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------
def test_worked_example_3x4():
  orders, inverse, codes = scan_lib.scan_tables(3, 4)
  np.testing.assert_array_equal(
    orders,
    [
      [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11],
      [11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],
      [0, 4, 8, 9, 5, 1, 2, 6, 10, 11, 7, 3],
      [3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0],
    ],
  )
  np.testing.assert_array_equal(
    codes,
    [
      [0, 1, 1, 1, 4, 2, 2, 2, 4, 1, 1, 1],
      [0, 2, 2, 2, 3, 1, 1, 1, 3, 2, 2, 2],
      [0, 4, 4, 1, 3, 3, 1, 4, 4, 1, 3, 3],
      [0, 4, 4, 2, 3, 3, 2, 4, 4, 2, 3, 3],
    ],
  )
  for k in range(4):
    np.testing.assert_array_equal(inverse[k][orders[k]], np.arange(12))


@pytest.mark.parametrize(
  'height,width', [(1, 1), (1, 5), (5, 1), (2, 2), (3, 3), (4, 6), (5, 8), (7, 7), (8, 5), (16, 16)]
)
def test_tables_are_adjacent_permutations(height, width):
  orders, inverse, codes = scan_lib.scan_tables(height, width)
  num = height * width
  assert orders.shape == inverse.shape == codes.shape == (4, num)
  for k in range(4):
    assert sorted(orders[k].tolist()) == list(range(num))
    np.testing.assert_array_equal(orders[k][inverse[k]], np.arange(num))
    rows, cols = np.divmod(orders[k], width)
    steps = np.abs(np.diff(rows)) + np.abs(np.diff(cols))
    assert (steps == 1).all()  # every move is to a 4-neighbour
    assert codes[k, 0] == 0 and (codes[k, 1:] >= 1).all()
  np.testing.assert_array_equal(orders[1], orders[0][::-1])
  np.testing.assert_array_equal(orders[3], orders[2][::-1])


def test_tables_match_golden_7x7():
  golden.require_golden()
  with np.load(golden.EVAL_NPZ) as data:
    ref_orders = data['__mamba0_scan_orders']
    ref_codes = data['__mamba0_scan_directions']
  orders, _, codes = scan_lib.scan_tables(7, 7)
  np.testing.assert_array_equal(orders, ref_orders)
  np.testing.assert_array_equal(codes, ref_codes)


def test_tables_are_cached_and_read_only():
  first = scan_lib.scan_tables(7, 7)
  assert scan_lib.scan_tables(7, 7)[0] is first[0]
  with pytest.raises(ValueError):
    first[0][0, 0] = 5


# ---------------------------------------------------------------------------------------------
# Fused Pallas kernels (run in the Pallas interpreter on the CPU; the GPU path is the same code)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('length,shared', [(12, True), (7, False)])
def test_fused_kernels_match_reference_values_and_gradients(length, shared):
  from vcmamba_jax.models import scan_pallas

  u, delta, A, B, C, D, bias = _inputs(
    jax.random.key(7), lead=(2, 4), length=length, inner=32, state=16
  )
  if shared:  # upstream VCMamba: delta and C shared by the 4 directions
    delta, C = delta[:, :1], C[:, :1]
  args = (u, delta, A, B, C, D, bias)
  ref = scan_lib.selective_scan(*args, impl='sequential')
  fused = scan_pallas.selective_scan_fused(*args, interpret=True)
  np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)
  weights = jax.random.normal(jax.random.key(8), u.shape)
  argnums = tuple(range(7))
  g_ref = jax.grad(
    lambda *a: jnp.sum(scan_lib.selective_scan(*a, impl='sequential') * weights), argnums
  )(*args)
  g_fused = jax.grad(
    lambda *a: jnp.sum(scan_pallas.selective_scan_fused(*a, interpret=True) * weights), argnums
  )(*args)
  for name, r, f in zip(['u', 'delta', 'A', 'B', 'C', 'D', 'bias'], g_ref, g_fused):
    assert r.shape == f.shape, name
    assert float(jnp.abs(r - f).max()) <= 1e-4 * float(jnp.abs(r).max()), name


def test_auto_impl_uses_associative_on_cpu():
  from vcmamba_jax.models import scan_pallas

  assert not scan_pallas.fused_scan_supported(49, 1024)  # CPU backend in tests
  args = _inputs(jax.random.key(9), length=9)
  np.testing.assert_array_equal(
    scan_lib.selective_scan(*args, impl='auto'), scan_lib.selective_scan(*args, impl='associative')
  )


@pytest.mark.parametrize('height,width', [(1, 1), (2, 3), (5, 8), (7, 7), (8, 5)])
def test_zigzag_sequences_and_merge_match_the_tables(height, width):
  """The gather-free reorderings give the values of the table gathers (and their transposes)."""
  orders, inverse, _ = scan_lib.scan_tables(height, width)
  num = height * width
  x = jax.random.normal(jax.random.key(0), (2, height, width, 3))
  expected = jnp.take(x.reshape(2, num, 3), orders, axis=1)
  np.testing.assert_array_equal(scan_lib.zigzag_sequences(x), expected)
  y = jax.random.normal(jax.random.key(1), (2, 4, num, 3))
  flat_inverse = (inverse + np.arange(4)[:, None] * num).reshape(-1)
  merged = jnp.take(y.reshape(2, 4 * num, 3), flat_inverse, axis=1).reshape(2, 4, num, 3).sum(1)
  np.testing.assert_allclose(
    scan_lib.zigzag_merge(y, height, width).reshape(2, num, 3), merged, rtol=1e-6, atol=1e-6
  )


def test_fused_probe_falls_back_with_one_notice_under_a_trace(caplog):
  """Where the Pallas GPU backend cannot compile (here: the CPU), the probe says so in one log
  line and returns False instead of raising, also when called while a jit is tracing."""
  from vcmamba_jax.models import scan_pallas

  results = []

  @jax.jit
  def outer(x):
    results.append(scan_pallas.probe_fused_kernels())
    return x + 1

  with caplog.at_level('WARNING'):
    outer(jnp.ones(()))
  assert results == [False]
  notices = [r for r in caplog.records if 'fused Pallas scan is unavailable' in r.getMessage()]
  assert len(notices) == 1


def test_fused_scan_lowers_to_triton_for_inference_and_training(monkeypatch):
  # No GPU here: a CUDA cross-lowering runs Pallas's Triton lowering at B's shapes (batch 128,
  # 4 directions, L = 49, E = 1024). Inference runs one kernel, the forward without its state
  # checkpoints; training the forward with them and the backward.
  from vcmamba_jax.models import pallas_gpu, scan_pallas

  monkeypatch.setattr(pallas_gpu, 'ptx_fma_works', lambda: True)  # its GPU check, passed
  f32 = jnp.float32
  seq = jax.ShapeDtypeStruct((512, 49, 1024), jnp.bfloat16)
  tok = jax.ShapeDtypeStruct((512, 49, 16), jnp.bfloat16)
  args = (seq, seq, jax.ShapeDtypeStruct((1024, 16), f32), tok, tok)
  args += (jax.ShapeDtypeStruct((1024,), f32),) * 2

  def lowered(fn):
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=('cuda',)).as_text()
    # Triton kernels, whether the [..., L / 7, E, N] float32 checkpoints exist, and whether the
    # multiply-adds are PTX fma (`scan_pallas.USE_FMA`; the interpreter cannot run them).
    return (
      text.count('custom_call @__gpu$xla.gpu.triton'),
      'x7x1024x16xf32>' in text,
      'fma.rn.f32' in text,
    )

  assert lowered(lambda *a: scan_pallas.selective_scan_fused(*a)) == (1, False, True)
  grad = jax.grad(lambda *a: scan_pallas.selective_scan_fused(*a).astype(f32).sum(), (0, 1))
  assert lowered(grad) == (2, True, True)
  monkeypatch.setattr(scan_pallas, 'USE_FMA', 0)  # (a new function: jit caches by function)
  grad = jax.grad(lambda *a: scan_pallas.selective_scan_fused(*a).astype(f32).sum(), (0, 1))
  assert lowered(grad) == (2, True, False)
