"""Access to the segmentation golden files in ../shared/golden (see SEG_README.json)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from tests.golden import GOLDEN_DIR

EVAL_NPZ = GOLDEN_DIR / 'sem_fpn_vcmamba_s_seed11.npz'
TRAIN_NPZ = GOLDEN_DIR / 'sem_fpn_vcmamba_s_seed11_train.npz'
MIOU_NPZ = GOLDEN_DIR / 'seg_miou_reference.npz'


def require() -> None:
  if not EVAL_NPZ.exists():
    if os.environ.get('CI'):
      pytest.fail(f'segmentation golden data missing at {GOLDEN_DIR} (set VCMAMBA_GOLDEN_DIR)')
    pytest.skip(f'segmentation golden data not found at {GOLDEN_DIR}')


def seg_weights():
  """The golden's numpy-only weight generator (shared/golden/seg_weights.py)."""
  spec = importlib.util.spec_from_file_location('seg_weights', GOLDEN_DIR / 'seg_weights.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load(path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def sample(nhwc, classes=None, rows=None, cols=None) -> np.ndarray:
  """NHWC port output -> the NCHW sampling of a reference."""
  x = np.asarray(nhwc).transpose(0, 3, 1, 2)
  if classes is not None:
    x = x[:, classes]
  if rows is not None:
    x = x[:, :, rows]
  if cols is not None:
    x = x[:, :, :, cols]
  return x


def max_rel(actual, ref) -> float:
  return float(np.abs(np.asarray(actual) - ref).max() / np.abs(ref).max())
