"""Segmentation loss and metrics with mmseg 0.29.1's definitions.

Loss (``CrossEntropyLoss``, ``avg_non_ignore=False``, the mmseg default the authors trained with):
per-pixel cross-entropy of the logits resized to the label size, ignored pixels (255) count 0 in
the sum but 1 in the denominator: ``sum(ce * valid) / (N * H * W)``.

Metrics (``intersect_and_union`` / ``total_area_to_metrics``): per class c, intersect = #(pred ==
label == c), union = #pred_c + #label_c - intersect over the pixels whose label is not ignored;
IoU = intersect / union and Acc = intersect / #label_c (NaN when the denominator is 0);
aAcc = sum(intersect) / sum(#label); mIoU / mAcc = nanmean. With ``reduce_zero_label`` (ADE20K)
the RAW annotation is mapped first: 0 ("other") -> 255 (ignored), k -> k - 1. Unlike mmseg, the
caller's label array is never modified in place.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------
# Loss (device).
# ---------------------------------------------------------------------------------------------
def cross_entropy(
  logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
  """mmseg's segmentation CE (avg_non_ignore=False).

  Args:
    logits: [B, H, W, K] at the label size (resize the stride-4 logits first).
    labels: int [B, H, W], values 0..K-1 or ``ignore_index``.

  Returns:
    float32 scalar: sum of the per-pixel CE over non-ignored pixels / (B * H * W).
  """
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.int32)
  valid = labels != ignore_index
  safe = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)) / labels.size


def pixel_accuracy(
  logits: jax.Array, labels: jax.Array, ignore_index: int = IGNORE_INDEX
) -> jax.Array:
  """mmseg ``accuracy`` (percent, top-1): (correct + eps) * 100 / (#non-ignored + eps)."""
  eps = float(np.finfo(np.float32).eps)
  valid = labels != ignore_index
  correct = jnp.sum((jnp.argmax(logits, axis=-1) == labels) & valid).astype(jnp.float32)
  return (correct + eps) * (100.0 / (jnp.sum(valid).astype(jnp.float32) + eps))


# ---------------------------------------------------------------------------------------------
# Areas: host (numpy) and device (jax) versions of mmseg's intersect_and_union.
# ---------------------------------------------------------------------------------------------
def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """ADE20K raw annotation -> training labels: 0 -> 255, k -> k - 1, 255 stays 255 (a copy)."""
  label = np.array(label, dtype=np.int64, copy=True)
  ignored = (label == 0) | (label == IGNORE_INDEX)
  return np.where(ignored, IGNORE_INDEX, label - 1)


def intersect_and_union(
  pred: np.ndarray,
  label: np.ndarray,
  num_classes: int,
  ignore_index: int = IGNORE_INDEX,
  reduce_zero_label: bool = False,
) -> np.ndarray:
  """int64 [4, num_classes]: area_intersect, area_union, area_pred_label, area_label of one
  (prediction, label) pair of the same [H, W] shape."""
  pred = np.asarray(pred)
  label = np.asarray(label)
  if pred.shape != label.shape:
    raise ValueError(f'prediction {pred.shape} and label {label.shape} differ in shape')
  if reduce_zero_label:
    label = globals()['reduce_zero_label'](label)
  keep = label != ignore_index
  pred, label = pred[keep].astype(np.int64), label[keep].astype(np.int64)

  def hist(x):  # torch.histc(bins=K, min=0, max=K-1): values outside [0, K-1] are not counted
    x = x[(x >= 0) & (x <= num_classes - 1)]
    return np.bincount(x, minlength=num_classes)[:num_classes]

  intersect = hist(pred[pred == label])
  area_pred, area_label = hist(pred), hist(label)
  return np.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


def device_areas(
  pred: jax.Array,
  label: jax.Array,
  num_classes: int,
  ignore_index: int = IGNORE_INDEX,
  reduce_zero_label: bool = False,
  mask: jax.Array | None = None,
) -> jax.Array:
  """``intersect_and_union`` summed over a batch, on the device: int32 [4, num_classes].

  ``pred`` / ``label`` int [..., H, W]; ``mask`` (bool, broadcastable) drops pixels (padding of
  a fixed canvas, padded batch rows). Sum the results of a split on the host in int64.
  """
  label = label.astype(jnp.int32)
  pred = pred.astype(jnp.int32)
  if reduce_zero_label:
    label = jnp.where((label == 0) | (label == ignore_index), ignore_index, label - 1)
  keep = label != ignore_index
  if mask is not None:
    keep = keep & mask

  def hist(values, where):
    where = where & (values >= 0) & (values <= num_classes - 1)
    index = jnp.where(where, values, num_classes).reshape(-1)
    return jnp.zeros(num_classes + 1, jnp.int32).at[index].add(1)[:num_classes]

  intersect = hist(pred, keep & (pred == label))
  area_pred, area_label = hist(pred, keep), hist(label, keep)
  return jnp.stack([intersect, area_pred + area_label - intersect, area_pred, area_label])


def areas_to_metrics(areas: np.ndarray) -> dict[str, object]:
  """mmseg ``total_area_to_metrics`` (+ the dataset's nanmean): areas [4, K] -> aAcc, mIoU, mAcc
  (floats in [0, 1]) and per-class IoU, Acc (float64 [K], NaN where the class is absent)."""
  intersect, union, _, area_label = (np.asarray(a, np.float64) for a in areas)
  with np.errstate(divide='ignore', invalid='ignore'):
    iou = intersect / union
    acc = intersect / area_label
    a_acc = float(intersect.sum() / area_label.sum())
  nan_mean = lambda x: float(np.nanmean(x)) if np.any(~np.isnan(x)) else float('nan')
  return {'aAcc': a_acc, 'mIoU': nan_mean(iou), 'mAcc': nan_mean(acc), 'IoU': iou, 'Acc': acc}


def mean_iou(
  preds: Iterable[np.ndarray],
  labels: Iterable[np.ndarray],
  num_classes: int,
  ignore_index: int = IGNORE_INDEX,
  reduce_zero_label: bool = False,
) -> dict[str, object]:
  """mmseg ``mean_iou`` over pairs of [H, W] predictions and labels (see ``areas_to_metrics``);
  also returns the summed ``areas`` (int64 [4, K])."""
  total = np.zeros((4, num_classes), np.int64)
  for pred, label in zip(preds, labels, strict=True):
    total += intersect_and_union(pred, label, num_classes, ignore_index, reduce_zero_label)
  return {**areas_to_metrics(total), 'areas': total}


def format_metrics(metrics: Mapping[str, object], class_names: list[str] | None = None) -> str:
  """mmseg-style summary (percent, 2 decimals), per-class IoU rows when names are given."""
  head = ', '.join(f'{k} {100 * float(metrics[k]):.2f}' for k in ('mIoU', 'mAcc', 'aAcc'))
  if not class_names:
    return head
  rows = [
    f'  {name:<20s} IoU {100 * iou:6.2f}  Acc {100 * acc:6.2f}'
    for name, iou, acc in zip(class_names, metrics['IoU'], metrics['Acc'])
  ]
  return '\n'.join([head, *rows])
