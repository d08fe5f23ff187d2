"""The smoke config every training test shares: one set of compiled programs for all of them
(the persistent compilation cache of tests/conftest.py replays them)."""

from __future__ import annotations

from ml_collections import ConfigDict

from vcmamba_jax.configs import vcmamba_s

NUM_TRAIN_STEPS = 8


def smoke_config(data_dir: str, **overrides) -> ConfigDict:
  """`vcmamba_jax/configs/vcmamba_s.py:smoke` on the fake ImageNet: vcmamba_nano at 32 px, global batch 32
  (4 per device on 8 devices), 8 steps, a metrics row per step, checkpoints at steps 4 and 8.

  `overrides`: dotted config keys, e.g. `**{'model.img_size': 64}`.
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
