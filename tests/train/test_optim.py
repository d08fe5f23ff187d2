"""The recipe's learning-rate schedule (timm, stepped per epoch) and AdamW weight-decay mask."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcmamba_jax import create_model
from vcmamba_jax.configs import vcmamba_b
from vcmamba_jax.train import optim

STEPS_PER_EPOCH = 10


class TimmCosineScheduler:
  """Independent re-statement of timm's CosineLRScheduler(t_initial=300, lr_min=1e-5,
  warmup_t=5, warmup_lr_init=1e-6, warmup_prefix=False, cycle_limit=1) as DeiT drives it:
  the optimizer starts at warmup_lr_init, and after epoch e the loop calls step(e)."""

  def __init__(self, base_lr: float):
    self.base_lr, self.t_initial, self.lr_min = base_lr, 300, 1e-5
    self.warmup_t, self.warmup_lr_init = 5, 1e-6
    self.warmup_steps = (base_lr - self.warmup_lr_init) / self.warmup_t
    self.lr = self.warmup_lr_init

  def step(self, epoch: int) -> None:
    t = epoch
    if t < self.warmup_t:
      self.lr = self.warmup_lr_init + t * self.warmup_steps
    elif t < self.t_initial:
      self.lr = self.lr_min + 0.5 * (self.base_lr - self.lr_min) * (
        1 + math.cos(math.pi * t / self.t_initial)
      )
    else:
      self.lr = self.lr_min


def _schedule(**overrides):
  config = vcmamba_b.get_config()
  for key, value in overrides.items():
    config.schedule[key] = value
  return optim.learning_rate_schedule(config, STEPS_PER_EPOCH), optim.peak_learning_rate(config)


def test_peak_lr_scales_with_the_global_batch():
  config = vcmamba_b.get_config()
  assert optim.peak_learning_rate(config) == pytest.approx(2e-3)  # 1e-3 * 1024 / 512
  config.global_batch_size = 4096
  assert optim.peak_learning_rate(config) == pytest.approx(8e-3)


def test_per_epoch_schedule_matches_timm_at_every_epoch():
  schedule, peak = _schedule()
  reference = TimmCosineScheduler(peak)
  expected = []
  for epoch in range(305):
    expected.append(reference.lr)
    reference.step(epoch)  # DeiT: lr_scheduler.step(epoch) after finishing epoch `epoch`
  epochs = np.arange(305)
  # The lr is constant within an epoch: check its first and its last step.
  for steps in (epochs * STEPS_PER_EPOCH, (epochs + 1) * STEPS_PER_EPOCH - 1):
    np.testing.assert_allclose(np.asarray(schedule(steps)), expected, rtol=1e-5)


def test_per_epoch_schedule_spot_values():
  schedule, peak = _schedule()
  lr = lambda epoch: float(schedule(epoch * STEPS_PER_EPOCH))
  f = lambda t: 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 300))
  assert lr(0) == pytest.approx(1e-6)  # set when the scheduler is built
  assert lr(1) == pytest.approx(1e-6)  # f(0)
  assert lr(2) == pytest.approx(1e-6 + (peak - 1e-6) / 5)  # f(1)
  assert lr(5) == pytest.approx(1e-6 + 4 * (peak - 1e-6) / 5)  # f(4): warmup's last step
  assert lr(6) == pytest.approx(f(5), rel=1e-6)  # first cosine epoch, 0.07% below the peak
  assert lr(151) == pytest.approx(f(150), rel=1e-6)  # half way: (peak + min) / 2
  assert lr(299) == pytest.approx(f(298), rel=1e-5)  # the last of the 300 epochs
  assert lr(400) == pytest.approx(1e-5)


def test_per_step_schedule_is_the_same_curve_without_the_epoch_delay():
  schedule, peak = _schedule(per_step=True)
  for step in (0, 3, 25, 49, 50, 51, 777, 1500, 2999):
    t = step / STEPS_PER_EPOCH
    expected = (
      1e-6 + t * (peak - 1e-6) / 5
      if t < 5
      else 1e-5 + 0.5 * (peak - 1e-5) * (1 + math.cos(math.pi * t / 300))
    )
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5), step


def test_no_warmup_starts_at_the_peak():
  schedule, peak = _schedule(warmup_epochs=0)
  assert float(schedule(0)) == pytest.approx(peak)
  assert float(schedule(STEPS_PER_EPOCH)) == pytest.approx(peak)  # f(0)


def _path_name(path) -> str:
  return '/'.join(str(getattr(k, 'key', k)) for k in path)


def test_adamw_decays_exactly_the_upstream_set():
  model = create_model('vcmamba_nano', num_classes=10, img_size=32)
  params = jax.eval_shape(
    lambda: model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 32, 32, 3)))
  )['params']
  params = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)
  config = vcmamba_b.get_config()
  tx = optim.create_optimizer(config, lambda count: 1.0)
  # Zero gradients: Adam's update is 0, so a parameter changes only through weight decay.
  updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  decayed = {
    _path_name(p): bool(np.any(np.asarray(u) != 0))
    for p, u in jax.tree_util.tree_leaves_with_path(updates)
  }

  def expect(fragment: str, value: bool) -> None:
    matches = {k: v for k, v in decayed.items() if fragment in k}
    assert matches, fragment
    assert all(v == value for v in matches.values()), (fragment, matches)

  # Not decayed: biases, BatchNorm / LayerNorm affines, D (all 1-d upstream).
  for fragment in (
    '/bias',
    'norm/scale',
    'norm1/scale',
    'norm2/scale',
    'mid_norm/scale',
    'in_norm/scale',
    'out_norm/scale',
    'mamba/D',
  ):
    expect(fragment, False)
  # Decayed (QUIRK 4): A_log, direction_Bs, layer_scale, pos_embed, and every kernel.
  for fragment in ('A_log', 'direction_Bs', 'layer_scale', 'pos_embed', 'kernel'):
    expect(fragment, True)
  # Decoupled decay, as torch AdamW: p <- p - lr * wd * p.
  assert np.allclose(updates['head']['kernel'], -config.optimizer.weight_decay)
