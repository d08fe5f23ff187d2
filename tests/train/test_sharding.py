"""Mesh, shardings of state and batch (data parallel and FSDP), and device-count invariance."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tests.train.smoke import smoke_config
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.train import builders, optim
from vcmamba_jax.train import state as state_lib

GLOBAL_BATCH = 32
STEPS_PER_EPOCH = 3  # what the fake ImageNet of the trainer tests gives (same compiled step)


def _setup(mesh, fsdp_min_size):
  config = smoke_config('unused')
  model = builders.build_model(config)
  schedule = optim.learning_rate_schedule(config, STEPS_PER_EPOCH)
  tx = optim.create_optimizer(config, schedule)
  state, shardings = state_lib.create_train_state(
    model,
    tx,
    jax.random.PRNGKey(0),
    mesh=mesh,
    image_size=config.model.img_size,
    use_ema=True,
    fsdp_min_size=fsdp_min_size,
  )
  return config, model, schedule, tx, state, shardings


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {
    'image': rng.integers(0, 256, (GLOBAL_BATCH, 32, 32, 3), dtype=np.uint8),
    'label': rng.integers(0, 1000, (GLOBAL_BATCH,)).astype(np.int32),
    'num_skipped': np.zeros((GLOBAL_BATCH,), np.int32),
  }


def _specs(tree):
  return [leaf.sharding.spec for leaf in jax.tree.leaves(tree)]


def test_mesh_axes():
  mesh = sharding_lib.create_mesh()
  assert dict(mesh.shape) == {'data': 8, 'fsdp': 1}
  assert dict(sharding_lib.create_mesh(fsdp=2).shape) == {'data': 4, 'fsdp': 2}
  assert dict(sharding_lib.create_mesh(fsdp=-1).shape) == {'data': 1, 'fsdp': 8}
  assert dict(sharding_lib.create_mesh(devices=jax.devices()[:1]).shape) == {'data': 1, 'fsdp': 1}
  with pytest.raises(ValueError, match='must divide the number of devices'):
    sharding_lib.create_mesh(fsdp=3)


def test_fsdp_partition_spec_picks_the_largest_divisible_dim():
  spec = sharding_lib.fsdp_partition_spec
  assert spec((64, 1000), 8) == P(None, 'fsdp')
  assert spec((1000, 64), 8) == P('fsdp', None)
  assert spec((3, 3, 16, 32), 8) == P(None, None, None, 'fsdp')
  assert spec((5, 16), 8) == P(None, 'fsdp')
  assert spec((1000, 10), 8) == P('fsdp', None)  # 1000 % 8 == 0
  assert spec((10, 7), 8) == P()  # nothing divisible: replicated
  assert spec((), 8) == P()
  assert spec((64, 1000), 1) == P()
  assert spec((64, 1000), 8, min_size=10**6) == P()  # too small to be worth it


def test_data_parallel_state_is_replicated_and_batch_split():
  mesh = sharding_lib.create_mesh()
  *_, state, shardings = _setup(mesh, fsdp_min_size=2**14)
  for tree in (state.params, state.batch_stats, state.opt_state, state.ema, state.step):
    assert all(spec == P() for spec in _specs(tree))
  assert jax.tree.leaves(state.params)[0].sharding.mesh == mesh
  assert jax.tree.map(lambda s: s.spec, shardings.params) == jax.tree.map(
    lambda x: x.sharding.spec, state.params
  )
  batch = sharding_lib.make_global_batch(mesh, _batch())
  for value in batch.values():
    assert value.sharding.spec == P(('data', 'fsdp'))
    assert {shard.data.shape[0] for shard in value.addressable_shards} == {GLOBAL_BATCH // 8}


def test_fsdp_shards_params_optimizer_state_and_ema_alike():
  mesh = sharding_lib.create_mesh(fsdp=8)
  *_, state, _ = _setup(mesh, fsdp_min_size=0)
  params = state.params
  assert params['head']['kernel'].sharding.spec == P(None, 'fsdp')  # [64, 1000]
  assert params['stage4']['block1']['mamba']['A_log'].sharding.spec == P('fsdp', None)  # [128, 16]
  assert params['stage4']['block1']['mamba']['direction_Bs'].sharding.spec == P(None, 'fsdp')
  assert params['stage4']['pos_embed'].sharding.spec == P(None, None, None, 'fsdp')  # [1,1,1,64]
  adam = state.opt_state[0]
  for moments in (adam.mu, adam.nu, state.ema['params']):
    assert _specs(moments) == _specs(params)
  assert adam.count.sharding.spec == P() and state.step.sharding.spec == P()
  # Each device holds 1/8 of the head kernel.
  assert params['head']['kernel'].addressable_shards[0].data.shape == (64, 125)


def test_fsdp_min_size_keeps_small_arrays_replicated():
  mesh = sharding_lib.create_mesh(fsdp=8)
  *_, state, _ = _setup(mesh, fsdp_min_size=2**14)
  for leaf in jax.tree.leaves(state.params):
    expected = P() if leaf.size < 2**14 else sharding_lib.fsdp_partition_spec(leaf.shape, 8)
    assert leaf.sharding.spec == expected


def _one_step(mesh, fsdp_min_size):
  config, model, schedule, tx, state, shardings = _setup(mesh, fsdp_min_size)
  step = builders.jit_train_step(model, tx, schedule, config, mesh, shardings)
  state, metrics = step(state, sharding_lib.make_global_batch(mesh, _batch()), {})
  return jax.device_get((state, metrics))


def test_one_step_on_8_devices_equals_one_step_on_1_device():
  reference_state, reference = _one_step(
    sharding_lib.create_mesh(devices=jax.devices()[:1]), fsdp_min_size=0
  )
  mu_ref = reference_state.opt_state[0].mu
  grad_scale = max(float(np.max(np.abs(x))) for x in jax.tree.leaves(mu_ref))  # 0.1 * max|g|
  # One 8-device program with both axes (data 4 x fsdp 2; arrays of 2**10+ elements sharded,
  # the small ones replicated): the batch split 8 ways, BatchNorm statistics over all of it,
  # and parameters, moments and EMA split over fsdp. (Data parallelism alone over 8 devices
  # is the trainer tests' program.)
  state, metrics = _one_step(sharding_lib.create_mesh(fsdp=2), fsdp_min_size=2**10)
  # Same loss: the augmentation randomness and the BatchNorm statistics are global.
  np.testing.assert_allclose(metrics['loss'], reference['loss'], rtol=1e-5)
  np.testing.assert_allclose(metrics['grad_norm'], reference['grad_norm'], rtol=1e-5)
  for new, ref in zip(
    jax.tree.leaves(state.batch_stats), jax.tree.leaves(reference_state.batch_stats)
  ):
    np.testing.assert_allclose(new, ref, rtol=1e-5, atol=1e-5)
  for new, ref in zip(jax.tree.leaves(state.opt_state[0].mu), jax.tree.leaves(mu_ref)):
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-4 * grad_scale)
  # Adam's first update is lr * g / (|g| + eps): ~ +-lr whatever |g| is, so entries whose true
  # gradient is 0 (biases before a BatchNorm) move by +-lr on float noise. Compare the others.
  for new, ref, mu in zip(
    jax.tree.leaves(state.params),
    jax.tree.leaves(reference_state.params),
    jax.tree.leaves(mu_ref),
  ):
    determined = np.abs(mu) > 1e-3 * grad_scale
    np.testing.assert_allclose(new[determined], ref[determined], rtol=0, atol=1e-6)
