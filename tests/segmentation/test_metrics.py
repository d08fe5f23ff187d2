"""mIoU / mAcc / aAcc / per-class IoU against mmseg's own numbers (seg_miou_reference.npz), and
the device accumulation against the host one."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from tests.segmentation import golden_seg as G
from vcmamba_jax import segmentation as seg

AREAS = ('area_intersect', 'area_union', 'area_pred_label', 'area_label')


@pytest.fixture(scope='module')
def ref():
  G.require()
  return G.load(G.MIOU_NPZ)


def pairs(ref):
  n = int(ref['__num_pairs'])
  return [ref[f'__pred_{i}'] for i in range(n)], [ref[f'__label_{i}'] for i in range(n)]


def check(result, ref, prefix, tol):
  for i, name in enumerate(AREAS):
    np.testing.assert_array_equal(result['areas'][i], ref[f'{prefix}_{name}'].astype(np.int64))
  for name in ('IoU', 'Acc'):
    want = ref[f'{prefix}_{name}']
    np.testing.assert_array_equal(np.isnan(result[name]), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.abs(result[name][ok] - want[ok]).max() <= tol, name
  for name in ('aAcc', 'mIoU', 'mAcc'):
    if f'{prefix}_{name}' in ref:
      assert abs(result[name] - float(ref[f'{prefix}_{name}'])) <= tol, name


def test_mean_iou_reduce_zero_label(ref):
  preds, labels = pairs(ref)
  before = [label.copy() for label in labels]
  result = seg.mean_iou(preds, labels, 150, reduce_zero_label=True)
  check(result, ref, '__rzl', 1e-12)
  assert int(np.isnan(result['IoU']).sum()) == 30 and int(np.isnan(result['Acc']).sum()) == 50
  # The float32 pre_eval path of the test loop agrees within its rounding.
  for name in ('IoU', 'Acc'):
    want = ref[f'__rzl_pre_eval_{name}']
    ok = ~np.isnan(want)
    assert np.abs(result[name][ok] - want[ok]).max() <= 1e-6
  assert abs(result['aAcc'] - float(ref['__rzl_pre_eval_aAcc'])) <= 1e-6
  # mmseg's log rounds to 2 decimals of a percent.
  for name in ('aAcc', 'mIoU', 'mAcc'):
    rounded = np.round(100 * result[name], 2) / 100
    assert rounded == pytest.approx(float(ref[f'__dataset_evaluate_{name}']), abs=1e-12)
  # Unlike mmseg, the caller's labels are not rewritten.
  for label, original in zip(labels, before):
    np.testing.assert_array_equal(label, original)


def test_mean_iou_without_reduce_zero_label(ref):
  preds, labels = pairs(ref)
  check(seg.mean_iou(preds, labels, 150, reduce_zero_label=False), ref, '__norzl', 1e-12)


def test_device_areas_match_host(ref):
  preds, labels = pairs(ref)
  for i, (pred, label) in enumerate(zip(preds, labels)):
    host = seg.intersect_and_union(pred, label, 150, reduce_zero_label=True)
    device = np.asarray(
      seg.device_areas(jnp.asarray(pred), jnp.asarray(label), 150, reduce_zero_label=True)
    )
    np.testing.assert_array_equal(device, host)
    for j, name in enumerate(AREAS):
      np.testing.assert_array_equal(host[j], ref[f'__rzl_{name}_{i}'].astype(np.int64))
  # A mask (padding of a fixed canvas) removes pixels from every count.
  pred, label = jnp.asarray(preds[0]), jnp.asarray(labels[0])
  mask = jnp.zeros(label.shape, bool).at[:, :40].set(True)
  masked = seg.device_areas(pred, label, 150, reduce_zero_label=True, mask=mask)
  host = seg.intersect_and_union(preds[0][:, :40], labels[0][:, :40], 150, reduce_zero_label=True)
  np.testing.assert_array_equal(np.asarray(masked), host)


def test_shape_mismatch_is_an_error():
  with pytest.raises(ValueError, match='differ in shape'):
    seg.intersect_and_union(np.zeros((4, 5)), np.zeros((5, 4)), 150)


def test_loss_counts_ignored_pixels_in_the_denominator():
  logits = jnp.zeros((1, 2, 2, 3))
  labels = jnp.array([[[0, 255], [255, 255]]])
  # One valid pixel with CE log(3); mean over the 4 pixels.
  assert float(seg.cross_entropy(logits, labels)) == pytest.approx(np.log(3) / 4, rel=1e-6)
