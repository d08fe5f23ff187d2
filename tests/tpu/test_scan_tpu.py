"""The Pallas TPU (Mosaic) selective scan in the Pallas interpreter, against the sequential
reference: forward and gradients, one and several token blocks, padded channel counts, the
upstream (delta and C shared by the four directions) and corrected layouts, bfloat16 inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.models import scan_tpu


def _inputs(seed, grid, inner, *, shared, dtype=jnp.float32, batch=1, state=16):
  """Scan operands as PlainMamba2D passes them: u [batch, 4, L, E]; delta and C with a size-1
  direction axis in the upstream (shared) layout."""
  length = grid[0] * grid[1]
  ks = jax.random.split(jax.random.key(seed), 7)
  dirs = 1 if shared else 4
  u = jax.random.normal(ks[0], (batch, 4, length, inner), dtype)
  delta = (0.5 * jax.random.normal(ks[1], (batch, dirs, length, inner))).astype(dtype)
  A = -jnp.exp(0.5 * jax.random.normal(ks[2], (inner, state)))
  B = jax.random.normal(ks[3], (batch, 4, length, state))
  C = jax.random.normal(ks[4], (batch, dirs, length, state)).astype(dtype)
  D = jax.random.normal(ks[5], (inner,))
  bias = 0.3 * jax.random.normal(ks[6], (inner,))
  return u, delta, A, B, C, D, bias


def _value_and_grads(fn, args, weights):
  @jax.jit
  def run(*a):
    y, vjp = jax.vjp(fn, *a)
    return y, vjp(weights.astype(y.dtype))

  return run(*args)


def _reference(*args):
  return scan_lib.selective_scan(*args, impl='sequential')


def _kernel(*args):
  return scan_tpu.selective_scan_tpu(*args, interpret=True)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


NAMES = ('u', 'delta', 'A', 'B', 'C', 'D', 'delta_bias')


@pytest.mark.parametrize(
  'grid,inner,shared',
  [
    ((7, 7), 576, True),  # VCMamba-S's stage 4 at 224 px: one token block, 576 -> 640 lanes
    ((9, 11), 1024, False),  # odd grid, 99 tokens: two token blocks (state checkpoint), B's E
  ],
)
def test_float32_forward_and_gradients_match_sequential(grid, inner, shared):
  args = _inputs(sum(grid) + inner, grid, inner, shared=shared)
  weights = jax.random.normal(jax.random.key(1), args[0].shape)
  y_ref, g_ref = _value_and_grads(_reference, args, weights)
  y, g = _value_and_grads(_kernel, args, weights)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  assert _rel(y, y_ref) < 1e-5
  for name, a, b in zip(NAMES, g, g_ref):
    assert a.shape == b.shape, name
    assert _rel(a, b) < 1e-4, (name, _rel(a, b))


def test_bfloat16_inputs_within_bfloat16_noise():
  args = _inputs(5, (5, 3), 576, shared=True, dtype=jnp.bfloat16)
  weights = jax.random.normal(jax.random.key(2), args[0].shape)
  y, g = _value_and_grads(_kernel, args, weights)
  # The reference on the same (bf16-valued) inputs in float32: the kernel's state is float32,
  # so the only differences are the bf16 rounding of the outputs and gradients.
  args32 = tuple(x.astype(jnp.float32) for x in args)
  y_ref, g_ref = _value_and_grads(_reference, args32, weights)
  assert y.dtype == jnp.bfloat16
  assert _rel(y, y_ref) < 2**-7
  for name, a, b in zip(NAMES, g, g_ref):
    assert a.dtype == args[NAMES.index(name)].dtype, name
    assert _rel(a, b) < 2**-7, (name, _rel(a, b))
  # And far from a wrong answer: the bf16 outputs track the reference element-wise.
  np.testing.assert_allclose(np.asarray(y, np.float32), y_ref, rtol=0.02, atol=0.02)


def test_auto_picks_the_kernel_on_tpu_only():
  assert scan_lib.resolve_auto(49, 576, platform='tpu') == 'pallas_tpu'
  assert scan_lib.resolve_auto(49, 576, platform='cpu') == 'associative'
  assert scan_lib.resolve_auto(49, 576, False, platform='tpu') == 'associative'


def test_chunked_fallback_matches_sequential():
  args = _inputs(7, (5, 4), 32, shared=True, state=4)
  weights = jax.random.normal(jax.random.key(3), args[0].shape)
  chunked = lambda *a: scan_lib.selective_scan(*a, impl='chunked')
  y, g = _value_and_grads(chunked, args, weights)
  y_ref, g_ref = _value_and_grads(_reference, args, weights)
  assert _rel(y, y_ref) < 1e-5
  for name, a, b in zip(NAMES, g, g_ref):
    assert _rel(a, b) < 1e-4, name
