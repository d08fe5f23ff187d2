"""Access to the authors' golden outputs in ../shared/golden (see its README.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
GOLDEN_DIR = Path(os.environ.get('VCMAMBA_GOLDEN_DIR', REPO.parent / 'shared' / 'golden'))
EVAL_NPZ = GOLDEN_DIR / 'vcmamba_s_seed0.npz'
TRAIN_NPZ = GOLDEN_DIR / 'vcmamba_s_seed0_train.npz'


def require_golden() -> None:
  if not EVAL_NPZ.exists():
    if os.environ.get('CI'):
      pytest.fail(f'golden data missing at {GOLDEN_DIR} (set VCMAMBA_GOLDEN_DIR)')
    pytest.skip(f'golden data not found at {GOLDEN_DIR}')


def load(path: Path) -> dict[str, np.ndarray]:
  with np.load(path) as data:
    return {k: data[k] for k in data.files}


def readme() -> dict:
  return json.loads((GOLDEN_DIR / 'README.json').read_text())


def state_dict(golden: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The golden weights as float32 (as the golden README's loading recipe says)."""
  return {
    k: (v.astype(np.float32) if v.dtype == np.float16 else v)
    for k, v in golden.items()
    if not k.startswith('__')
  }


def nchw_to_nhwc(x: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(x.transpose(0, 2, 3, 1))


def rel_max_err(actual, ref) -> float:
  return float(np.abs(np.asarray(actual) - ref).max() / np.abs(ref).max())
