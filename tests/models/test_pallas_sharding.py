"""The Pallas GPU kernels (fused scan, depthwise conv) under the trainer's mesh: each device runs
them on its own share of the batch (`sharding.per_device`). XLA cannot partition a Pallas
kernel; given batch-split operands it gathered the whole batch onto every device and ran the
kernel there."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from vcmamba_jax import sharding
from vcmamba_jax.models import batchnorm_pallas, depthwise_pallas, ops, scan_pallas


def _mesh():
  mesh = sharding.create_mesh()
  assert mesh.size == 8  # tests/conftest.py: 8 simulated CPU devices
  return mesh


def _triton_batches(fn, mesh, args):
  """Leading axis of each Triton kernel's first operand, in a CUDA cross-lowering of `fn` traced
  under `mesh` (no GPU here)."""
  traced = jax.jit(sharding.traced_under_mesh(fn, mesh)).trace(*args)
  text = traced.lower(lowering_platforms=('cuda',)).as_text()
  calls = [line for line in text.splitlines() if 'custom_call @__gpu$xla.gpu.triton' in line]
  return [int(re.search(r': \(tensor<(\d+)x', line).group(1)) for line in calls]


def test_the_gpu_kernels_see_one_devices_share_of_the_batch():
  mesh = _mesh()
  split, whole = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((128, 56, 56, 256), jnp.bfloat16, sharding=split)
  k = jax.ShapeDtypeStruct((3, 3, 256), jnp.bfloat16, sharding=whole)
  b = jax.ShapeDtypeStruct((256,), jnp.float32, sharding=whole)
  forward = lambda x, k, b: depthwise_pallas.depthwise_forward(x, k, b)
  backward = lambda x, g, k: depthwise_pallas.depthwise_backward(x, g, k)
  assert _triton_batches(forward, mesh, (x, k, b)) == [16]
  assert _triton_batches(backward, mesh, (x, x, k)) == [16]
  p = jax.ShapeDtypeStruct((5, 256), jnp.float32, sharding=whole)
  with_bn = lambda x, g, k, p: depthwise_pallas.depthwise_backward(x, g, k, bn=(x, p))
  assert _triton_batches(with_bn, mesh, (x, x, k, p)) == [16]
  # BatchNorm's backward sums: each device's 16 images as [16 * 56 * 56, C] rows.
  sums = lambda x, g, b: batchnorm_pallas.backward_sums(x, g, b, b, b, b, 'gelu')
  assert _triton_batches(sums, mesh, (x, x, b)) == [16 * 56 * 56]
  # The scan of B's Mamba layers: [batch, 4 directions, L, E] -> 512 sequences, 64 a device.
  f32 = jnp.float32
  seq = jax.ShapeDtypeStruct((128, 4, 49, 1024), jnp.bfloat16, sharding=split)
  tok = jax.ShapeDtypeStruct((128, 4, 49, 16), jnp.bfloat16, sharding=split)
  vec = jax.ShapeDtypeStruct((1024,), f32, sharding=whole)
  args = (seq, seq, jax.ShapeDtypeStruct((1024, 16), f32, sharding=whole), tok, tok, vec, vec)
  loss = lambda *a: scan_pallas.selective_scan_fused(*a).astype(f32).sum()
  assert _triton_batches(jax.grad(loss, (0, 1)), mesh, args) == [64, 64]


def test_the_kernels_per_device_compute_what_they_compute_whole():
  # In the Pallas interpreter, 8 devices with 2 images (8 sequences) each against one device:
  # outputs, batch moments, BatchNorm's backward sums and gradients (whose partials are summed
  # across devices).
  mesh = _mesh()
  keys = jax.random.split(jax.random.key(3), 8)
  x = jax.random.normal(keys[0], (16, 5, 6, 16)) + 1
  w = jax.random.normal(keys[1], (3, 3, 1, 16))
  bias = jax.random.normal(keys[2], (16,))
  u = jax.random.normal(keys[3], (16, 4, 7, 32))
  delta = jax.random.normal(keys[4], (16, 1, 7, 32))  # shared by the directions, as upstream
  A = -jnp.exp(jax.random.normal(keys[5], (32, 8)))
  B, C = jax.random.normal(keys[6], (2, 16, 4, 7, 8))
  D = jax.random.normal(keys[7], (32,))
  args = (x, w, bias, u, delta, A, B, C, D)

  def loss(x, w, bias, u, delta, A, B, C, D):
    # On the CPU, impl 'pallas' and the fused scan run their kernels in the interpreter.
    y, (mean, var) = ops.depthwise_conv_with_moments(x, w, bias, impl='pallas')
    s = scan_pallas.selective_scan_fused(u, delta, A, B, C, D, interpret=True)
    # (A backward pass's op, not differentiated: on stopped values.)
    bn = jax.lax.stop_gradient((x, y, mean, jax.lax.rsqrt(var + 1e-5), w[0, 0, 0], bias))
    sums = batchnorm_pallas.backward_sums(*bn, 'gelu', interpret=True)
    loss = jnp.sum(jnp.sin(y)) + jnp.sum(mean * var) + jnp.sum(jnp.sin(s))
    return loss, (y, mean, var, s, sums)

  run = jax.grad(loss, argnums=tuple(range(len(args))), has_aux=True)
  whole = jax.jit(run)(*args)
  split, same = NamedSharding(mesh, P(sharding.BATCH_AXES)), NamedSharding(mesh, P())
  placed = [jax.device_put(a, split if a.shape[0] == 16 else same) for a in args]
  per_device = jax.jit(sharding.traced_under_mesh(run, mesh))(*placed)
  for got, want in zip(jax.tree.leaves(per_device), jax.tree.leaves(whole), strict=True):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * float(jnp.abs(want).max()))
