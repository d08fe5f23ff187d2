"""Device ops: normalisation, label smoothing, mixup/cutmix (incl. sharded jit), random erasing."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from vcmamba_jax import data as vd


def _distinct_images(batch: int, size: int = 16) -> jnp.ndarray:
  # Image b is the constant b + 1, so every pixel tells which image it came from.
  return jnp.broadcast_to(
    jnp.arange(1, batch + 1, dtype=jnp.float32)[:, None, None, None], (batch, size, size, 3)
  )


def test_normalize_uses_imagenet_statistics():
  images = jnp.array([[[[0, 128, 255]]]], jnp.uint8)
  out = vd.normalize(images)
  expected = (np.array([0, 128, 255]) / 255 - np.array(vd.IMAGENET_MEAN)) / np.array(
    vd.IMAGENET_STD
  )
  np.testing.assert_allclose(np.asarray(out)[0, 0, 0], expected, rtol=1e-6)
  assert out.dtype == jnp.float32 and vd.normalize(images, jnp.bfloat16).dtype == jnp.bfloat16


def test_one_hot_smoothed_values():
  targets = vd.one_hot_smoothed(jnp.array([2, 0]), 1000, 0.1)
  assert float(targets[0, 2]) == pytest.approx(0.9 + 0.1 / 1000)
  assert float(targets[0, 0]) == pytest.approx(0.1 / 1000)
  np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(vd.one_hot_smoothed(jnp.array([1]), 3), [[0.0, 1.0, 0.0]])


_BATCH, _SIZE, _CLASSES = 8, 16, 10
# One compiled function shared by the mixup tests (compiling is the slow part on CPU).
_mix = jax.jit(functools.partial(vd.mixup_cutmix, num_classes=_CLASSES))


def _mix_many(num_seeds):
  images = _distinct_images(_BATCH, _SIZE)
  labels = jnp.arange(_BATCH) % _CLASSES
  for seed in range(num_seeds):
    mixed, targets = _mix(jax.random.key(seed), images, labels)
    yield np.asarray(images), np.asarray(mixed), np.asarray(targets)


def _lambda_of_first_row(targets):
  # targets[0] = lam * smooth(label 0) + (1 - lam) * smooth(label 7); the labels differ.
  off, on = 0.1 / _CLASSES, 0.9 + 0.1 / _CLASSES
  return (targets[0, 0] - off) / (on - off), off, on


def test_cutmix_lambda_equals_the_pasted_area_and_mixup_blends():
  kinds = {'cutmix': [], 'mixup': []}
  for images, mixed, targets in _mix_many(160):
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
    lam, off, on = _lambda_of_first_row(targets)
    np.testing.assert_allclose(targets[0, 7], off + (1 - lam) * (on - off), rtol=1e-5)
    pasted = np.isclose(mixed[0], images[-1]).all(-1)
    kept = np.isclose(mixed[0], images[0]).all(-1)
    if (pasted | kept).all():  # cutmix: every pixel comes from one of the two images
      kinds['cutmix'].append(lam)
      assert 1 - lam == pytest.approx(pasted.mean(), abs=1e-6)
      # The pasted region is one axis-aligned box, at the same place in every image.
      rows, cols = np.nonzero(pasted)
      if rows.size:
        assert pasted[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()
      np.testing.assert_array_equal(np.isclose(mixed[3], images[4]).all(-1), pasted)
    else:  # mixup: x * lam + flip(x) * (1 - lam), one lambda for the whole batch
      kinds['mixup'].append(lam)
      np.testing.assert_allclose(mixed, images * lam + images[::-1] * (1 - lam), rtol=1e-5)
  # switch_prob 0.5; Beta(0.8, 0.8) mixup lambdas have mean 0.5; cutmix lambdas are corrected
  # up (boxes clipped at the border, even-sized) so their mean is above 0.5.
  assert 0.35 < len(kinds['cutmix']) / 160 < 0.65
  assert 0.38 < np.mean(kinds['mixup']) < 0.62
  assert 0.5 < np.mean(kinds['cutmix']) < 0.85
  assert np.std(kinds['mixup']) > 0.2  # a spread-out Beta, not a constant


def test_symmetric_betas_have_the_beta_mean_and_variance():
  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); Beta(1, 1) is uniform (variance 1/12).
  draws = jax.jit(jax.vmap(lambda k: vd.symmetric_betas(k, [0.8, 1.0, 5.0])))(
    jax.random.split(jax.random.key(0), 20000)
  )
  draws = np.asarray(draws)
  assert draws.shape == (20000, 3) and (draws > 0).all() and (draws < 1).all()
  np.testing.assert_allclose(draws.mean(0), 0.5, atol=0.01)
  np.testing.assert_allclose(draws.var(0), [1 / 10.4, 1 / 12, 1 / 44], rtol=0.05)
  assert abs(np.corrcoef(draws[:, 0], draws[:, 1])[0, 1]) < 0.03  # independent


def test_mixup_disabled_returns_smoothed_one_hot():
  images = _distinct_images(4)
  out, targets = vd.mixup_cutmix(
    jax.random.key(0), images, jnp.arange(4), num_classes=4, mixup_alpha=0.0, cutmix_alpha=0.0
  )
  assert out is images
  np.testing.assert_allclose(targets, vd.one_hot_smoothed(jnp.arange(4), 4, 0.1))


def test_mixup_cutmix_under_jit_with_a_batch_sharded_over_devices():
  devices = np.array(jax.devices())
  if devices.size < 2 or _BATCH % devices.size:
    pytest.skip('needs 2-8 (simulated) devices; tests/conftest.py sets 8 CPU devices')
  sharding = NamedSharding(Mesh(devices, ('data',)), PartitionSpec('data'))
  images = jax.random.normal(jax.random.key(1), (_BATCH, _SIZE, _SIZE, 3))
  labels = jnp.arange(_BATCH) % _CLASSES
  for seed in (0, 1, 2, 3):  # covers both mixup and cutmix
    expected = _mix(jax.random.key(seed), images, labels)
    got = _mix(
      jax.random.key(seed), jax.device_put(images, sharding), jax.device_put(labels, sharding)
    )
    assert got[0].sharding.is_equivalent_to(sharding, 4)
    for a, b in zip(got, expected, strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_random_erasing_touches_a_quarter_of_images_with_one_in_bounds_box():
  batch, height, width = 2000, 24, 20
  images = jnp.full((batch, height, width, 3), 7.0)
  out = np.asarray(jax.jit(vd.random_erasing)(jax.random.key(0), images))
  changed = (out != 7.0).any(-1)  # [B, H, W]
  erased = changed.any(axis=(1, 2))
  assert 0.72 < 1 - erased.mean() < 0.78  # ~75% untouched (p = 0.25; 3 sigma = 0.03)
  areas = []
  for mask in changed[erased][:300]:
    rows, cols = np.nonzero(mask)
    box_h, box_w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()  # one full box
    assert mask.sum() == box_h * box_w and box_h < height and box_w < width
    areas.append(box_h * box_w / (height * width))
  # area ~ U(0.02, 1/3) up to rounding of the box sides to whole pixels
  assert min(areas) >= 0.01 and max(areas) <= 0.4
  filled = out[erased][changed[erased]]  # per-pixel N(0, 1) fill
  assert abs(filled.mean()) < 0.05 and abs(filled.std() - 1) < 0.05


def test_random_erasing_const_mode_erases_every_image_when_prob_is_one():
  images = jnp.full((64, 16, 16, 3), 3.0)
  erase = jax.jit(functools.partial(vd.random_erasing, prob=1.0, mode='const'))
  out = np.asarray(erase(jax.random.key(0), images))
  assert set(np.unique(out).tolist()) == {0.0, 3.0} and (out == 0).any(axis=(1, 2, 3)).all()
