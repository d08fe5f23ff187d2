"""Learning-rate schedule and optimizer of the recipe (timm cosine + AdamW, upstream exemptions)."""

from __future__ import annotations

import math
from collections.abc import Callable

import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from vcmamba_jax.models import weight_decay_mask

Schedule = Callable[[jnp.ndarray], jnp.ndarray]


def peak_learning_rate(config: ConfigDict) -> float:
  """base_lr scaled linearly with the global batch (DeiT: lr * batch / 512)."""
  return config.optimizer.base_lr * config.global_batch_size / config.optimizer.base_batch_size


def timm_cosine_lr(
  epoch: jnp.ndarray | float,
  *,
  peak_lr: float,
  warmup_epochs: float,
  warmup_lr: float,
  min_lr: float,
  decay_epochs: float,
) -> jnp.ndarray:
  """timm `CosineLRScheduler._get_lr(t)` (warmup_prefix=False, one cycle) at epoch `t`.

  f(t) = warmup_lr + t * (peak - warmup_lr) / warmup_epochs   for t < warmup_epochs
  f(t) = min_lr + (peak - min_lr) * (1 + cos(pi * t / decay_epochs)) / 2   otherwise
  (min_lr from t >= decay_epochs on). `t` may be fractional (per-step schedules).
  """
  t = jnp.asarray(epoch, jnp.float32)
  progress = jnp.minimum(t / decay_epochs, 1.0)
  cosine = min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + jnp.cos(math.pi * progress))
  if warmup_epochs <= 0:
    return cosine
  warmup = warmup_lr + t * (peak_lr - warmup_lr) / warmup_epochs
  return jnp.where(t < warmup_epochs, warmup, cosine)


def learning_rate_schedule(config: ConfigDict, steps_per_epoch: int) -> Schedule:
  """lr as a function of the number of completed updates (optax's `count`), jittable.

  Per-epoch mode (default, as upstream): the lr is constant within an epoch; epoch 0 runs at
  `warmup_lr` (timm sets it when the scheduler is built) and epoch e >= 1 at f(e - 1), because
  DeiT calls `scheduler.step(e)` after finishing epoch e. Without warmup, epoch 0 runs at f(0).
  Per-step mode: f(step / steps_per_epoch), the same curve without the one-epoch delay.
  """
  s = config.schedule
  f = lambda t: timm_cosine_lr(
    t,
    peak_lr=peak_learning_rate(config),
    warmup_epochs=s.warmup_epochs,
    warmup_lr=s.warmup_lr,
    min_lr=s.min_lr,
    decay_epochs=s.decay_epochs,
  )

  if s.per_step:
    return lambda count: f(jnp.asarray(count, jnp.float32) / steps_per_epoch)

  initial = s.warmup_lr if s.warmup_epochs > 0 else f(0.0)

  def per_epoch(count):
    epoch = jnp.asarray(count, jnp.int32) // steps_per_epoch
    return jnp.where(epoch == 0, initial, f(jnp.maximum(epoch - 1, 0)))

  return per_epoch


def create_optimizer(config: ConfigDict, schedule: Schedule) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay, as torch.optim.AdamW) with the upstream no-decay set.

  Weight decay skips biases and 1-d tensors (norm affines, D) but, as upstream, applies to A_log,
  direction_Bs, layer_scale and pos_embed (`vcmamba_jax.models.weight_decay_mask`).
  """
  o = config.optimizer
  adamw = optax.adamw(
    schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask
  )
  if o.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
  return adamw
