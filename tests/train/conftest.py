"""Fixtures of the training tests: a fake ImageNet built by the real TFDS builder and a finished
reference run of the shared smoke config (`tests/train/smoke.py`)."""

from __future__ import annotations

import pytest

from tests.train.smoke import smoke_config
from vcmamba_jax import data, train


@pytest.fixture(scope='session')
def imagenet_dir(tmp_path_factory) -> str:
  """TFDS data_dir holding `imagenet2012` (ArrayRecord) built from a synthetic manual_dir:
  10 classes x 10 train images (2 of them undecodable) and 20 validation images."""
  root = tmp_path_factory.mktemp('imagenet')
  data.write_fake_imagenet_manual_dir(
    root / 'manual',
    num_classes=10,
    images_per_class=10,
    num_val=20,
    corrupt_train=2,
    image_size=(40, 80),
  )
  data.prepare_imagenet2012(root / 'manual', root / 'tfds')
  return str(root / 'tfds')


@pytest.fixture(scope='session')
def reference_run(imagenet_dir, tmp_path_factory) -> str:
  """An uninterrupted run of `smoke_config`; returns its workdir."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = train.run(smoke_config(imagenet_dir), workdir)
  assert not result.get('preempted')
  return workdir
