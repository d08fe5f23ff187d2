"""Config files: the paper recipe, smoke variants, locked fields."""

from __future__ import annotations

import importlib
import re

import pytest

from vcmamba_jax.configs import common

CONFIGS = ('vcmamba_s', 'vcmamba_m', 'vcmamba_b', 'digits')


@pytest.mark.parametrize('name', CONFIGS)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_configs_build_and_document_themselves(name, arg):
  module = importlib.import_module(f'vcmamba_jax.configs.{name}')
  config = module.get_config(arg)
  config.lock()
  with pytest.raises(AttributeError):
    config.not_a_field = 1
  assert f'python main.py --config=vcmamba_jax/configs/{name}.py' in module.__doc__
  assert 'Expected' in module.__doc__


@pytest.mark.parametrize(
  'name,paper_top1', [('vcmamba_s', '78.7'), ('vcmamba_m', '81.5'), ('vcmamba_b', '82.6')]
)
def test_paper_recipe(name, paper_top1):
  module = importlib.import_module(f'vcmamba_jax.configs.{name}')
  assert paper_top1 in module.__doc__
  assert re.search(r'[0-9],[0-9]{3} img/s', module.__doc__)  # a measured number (README)
  config = module.get_config()
  assert config.model.name == name and config.model.img_size == 224
  assert config.model.drop_path_rate == 0.2 and config.model.dtype == 'float32'
  assert (config.optimizer.base_lr, config.optimizer.base_batch_size) == (1e-3, 512)
  assert (config.optimizer.b1, config.optimizer.b2, config.optimizer.eps) == (0.9, 0.999, 1e-8)
  assert config.optimizer.weight_decay == 0.05 and config.optimizer.grad_clip_norm == 0
  s = config.schedule
  assert (s.warmup_epochs, s.warmup_lr, s.min_lr, s.decay_epochs, s.per_step) == (
    5,
    1e-6,
    1e-5,
    300,
    False,
  )
  assert config.num_epochs == 300 and config.global_batch_size == 1024
  a = config.aug
  assert (a.mixup_alpha, a.cutmix_alpha, a.mixup_switch_prob, a.label_smoothing) == (
    0.8,
    1.0,
    0.5,
    0.1,
  )
  assert (a.random_erasing_prob, a.random_erasing_mode) == (0.25, 'pixel')
  d = config.data
  assert d.randaugment == 'rand-m9-mstd0.5-inc1' and d.repeated_aug == 3
  assert d.eval_crop_pct == 0.875 and d.interpolation == 'bicubic'
  assert config.ema_decay == 0.99996 and config.loss.dist_head_weight == 0.5
  t = config.distillation  # the released scripts: DeiT soft distillation from RegNetY-160
  assert (t.type, t.teacher, t.alpha, t.tau) == ('soft', 'regnety_160', 0.5, 1.0)
  assert module.get_config('smoke').distillation.type == 'none'  # no teacher file needed


def test_smoke_is_tiny_and_unknown_args_fail():
  config = importlib.import_module('vcmamba_jax.configs.vcmamba_b').get_config('smoke')
  assert config.model.name == 'vcmamba_nano' and config.num_train_steps > 0
  with pytest.raises(ValueError, match='unknown config argument'):
    importlib.import_module('vcmamba_jax.configs.vcmamba_b').get_config('smok')
  assert common.parse_arg('smoke', smoke=False).smoke


def test_digits_schedule_follows_the_epoch_count():
  config = importlib.import_module('vcmamba_jax.configs.digits').get_config()
  config.num_epochs = 7
  assert config.schedule.decay_epochs == 7
