"""Fixtures of the training tests: a fake ImageNet built by the real TFDS builder, and the
smoke config every training test shares (one set of compiled programs for all of them)."""

from __future__ import annotations

import pytest
from ml_collections import ConfigDict

from configs import vcmamba_s
from vcmamba_jax import data, train

NUM_TRAIN_STEPS = 8


@pytest.fixture(scope='session')
def imagenet_dir(tmp_path_factory) -> str:
  """TFDS data_dir holding `imagenet2012` (ArrayRecord) built from a synthetic manual_dir:
  10 classes x 10 train images (2 of them undecodable) and 20 validation images."""
  root = tmp_path_factory.mktemp('imagenet')
  data.write_fake_imagenet_manual_dir(root / 'manual', num_classes=10, images_per_class=10,
                                      num_val=20, corrupt_train=2, image_size=(40, 80))
  data.prepare_imagenet2012(root / 'manual', root / 'tfds')
  return str(root / 'tfds')


def smoke_config(data_dir: str, **overrides) -> ConfigDict:
  """`configs/vcmamba_s.py:smoke` on the fake ImageNet: vcmamba_nano at 32 px, global batch 32
  (4 per device on 8 devices), 8 steps, a metrics row per step, checkpoints at steps 4 and 8.

  `overrides`: dotted config keys, e.g. `**{'debug.nan_at_step': 6}`.
  """
  config = vcmamba_s.get_config('smoke')
  config.data.dataset = 'imagenet2012'
  config.data.data_dir = data_dir
  config.model.num_classes = 1000
  config.num_train_steps = NUM_TRAIN_STEPS
  config.log_every_steps = 1
  config.checkpoint_every_steps = 4
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  config.lock()
  return config


@pytest.fixture(scope='session')
def reference_run(imagenet_dir, tmp_path_factory) -> str:
  """An uninterrupted run of `smoke_config`; returns its workdir."""
  workdir = str(tmp_path_factory.mktemp('reference'))
  result = train.run(smoke_config(imagenet_dir), workdir)
  assert not result.get('preempted')
  return workdir
