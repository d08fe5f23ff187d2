"""Pure train and eval step functions (jitted by the caller with explicit shardings)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

from vcmamba_jax import data as data_lib
from vcmamba_jax.train import distillation
from vcmamba_jax.train.optim import Schedule
from vcmamba_jax.train.state import TrainState, ema_update

Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]


# ------------------------------------------------------------------------------------------------
# Losses.
# ------------------------------------------------------------------------------------------------


def soft_target_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """timm SoftTargetCrossEntropy per example: -sum(targets * log_softmax(logits)), float32 [B]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(targets.astype(jnp.float32) * log_probs, axis=-1)


def two_head_loss(
  out: Mapping[str, jax.Array], targets: jax.Array, dist_head_weight: float
) -> jax.Array:
  """(1 - w) * CE(head) + w * CE(dist_head), each averaged over the batch (float32 scalar).

  With w = 0.5 and one-hot targets this is the loss of the golden reference tests; it stands in
  for DeiT's distillation loss (0.5 * CE(head) + 0.5 * KD(dist_head, teacher)) without a teacher.
  """
  loss = (1.0 - dist_head_weight) * soft_target_cross_entropy(out['logits_head'], targets).mean()
  if dist_head_weight:
    loss += dist_head_weight * soft_target_cross_entropy(out['logits_dist'], targets).mean()
  return loss


def distillation_loss(
  out: Mapping[str, jax.Array],
  targets: jax.Array,
  teacher_logits: jax.Array,
  *,
  kind: str,
  alpha: float,
  tau: float,
) -> jax.Array:
  """DeiT's DistillationLoss (float32 scalar): (1 - alpha) * CE(head, targets) + alpha * KD.

  Args:
    out: the student's intermediates, with logits_head and logits_dist [B, K].
    targets: soft (mixed, smoothed) targets [B, K].
    teacher_logits: [B, K], the teacher's output on the student's input (no gradient).
    kind: 'soft' (KL at temperature tau / number of logits) or 'hard' (CE on the argmax).
  """
  base = soft_target_cross_entropy(out['logits_head'], targets).mean()
  if kind == 'soft':
    kd = distillation.soft_distillation(out['logits_dist'], teacher_logits, tau)
  elif kind == 'hard':
    kd = distillation.hard_distillation(out['logits_dist'], teacher_logits)
  else:
    raise ValueError(f"distillation kind {kind!r}: 'soft' or 'hard'")
  return (1.0 - alpha) * base + alpha * kd


def global_norm(tree: Any) -> jax.Array:
  """l2 norm over all leaves (float32), as ``optax.tree.norm``, in one reduction.

  ``optax.tree.norm`` reduces every leaf separately: for VCMamba-B's ~390 leaves that is ~390
  tiny kernels per norm on a GPU (~1.3 ms of a train step). Concatenating the squared leaves
  lets XLA fuse them into one reduction.
  """
  leaves = [jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)]
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


# ------------------------------------------------------------------------------------------------
# Train step.
# ------------------------------------------------------------------------------------------------


def augment_batch(rng: jax.Array, batch: Batch, config: ConfigDict) -> tuple[jax.Array, jax.Array]:
  """uint8 images + int labels -> normalised, erased, mixed float32 images and soft targets.

  The DeiT order: normalise -> random erasing -> mixup/cutmix (with smoothed one-hot targets).
  """
  aug = config.aug
  erase_rng, mix_rng = jax.random.split(rng)
  images = data_lib.normalize(batch['image'])
  if aug.random_erasing_prob > 0:
    images = data_lib.random_erasing(
      erase_rng, images, prob=aug.random_erasing_prob, mode=aug.random_erasing_mode
    )
  return data_lib.mixup_cutmix(
    mix_rng,
    images,
    batch['label'],
    num_classes=config.model.num_classes,
    mixup_alpha=aug.mixup_alpha,
    cutmix_alpha=aug.cutmix_alpha,
    switch_prob=aug.mixup_switch_prob,
    prob=aug.mixup_prob,
    label_smoothing=aug.label_smoothing,
  )


LossFn = Callable[..., tuple[jax.Array, tuple[Any, Metrics]]]


def make_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: Schedule,
  config: ConfigDict,
  teacher: nn.Module | None = None,
  task_loss_fn: LossFn | None = None,
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, Metrics]]:
  """Returns `train_step(state, batch, teacher_variables) -> (state, metrics)`.

  `batch`: global arrays image uint8 [B, H, W, 3], label int32 [B] and, optionally, num_skipped
  int32 [B] (undecodable records the input pipeline skipped, reported as a metric).
  `teacher` / `teacher_variables`: with `config.distillation.type` 'soft' or 'hard', the frozen
  teacher model and its {'params', 'batch_stats'}; it runs in eval mode on exactly the
  augmented, mixed images the student sees, without gradient (and `{}` when there is none).
  `metrics`: scalars loss, grad_norm (global l2), param_norm (after the update), lr (of this
  update), update_ok (False when the loss or the gradients were non-finite: the update was not
  applied), skipped_updates (total so far) and skipped_records (this batch).
  The step's randomness (augmentation, drop path) is drawn from fold_in(state.rng, state.step),
  so a resumed run repeats it exactly.
  `task_loss_fn(params, batch_stats, batch, rng) -> (loss, (batch_stats, extra_metrics))`
  replaces the classification loss (augmentation included) for another task, e.g.
  segmentation; its extra metrics are reported too.
  """
  ema_decay = config.ema_decay
  # Classification only (a task_loss_fn brings its own loss and config).
  dist_head_weight = config.loss.dist_head_weight if task_loss_fn is None else 0.0
  kind = distillation.distillation_type(config)
  if (kind != 'none') != (teacher is not None):
    raise ValueError(f'distillation.type={kind!r} and teacher={teacher!r} do not go together')

  def train_step(
    state: TrainState, batch: Batch, teacher_variables: Any
  ) -> tuple[TrainState, Metrics]:
    step_rng = jax.random.fold_in(state.rng, state.step)
    if task_loss_fn is not None:

      def task_loss(params):
        return task_loss_fn(params, state.batch_stats, batch, step_rng)

      return _update(state, batch, task_loss)
    aug_rng, drop_path_rng = jax.random.split(step_rng)
    images, targets = augment_batch(aug_rng, batch, config)
    teacher_logits = None
    if teacher is not None:
      teacher_logits, _ = teacher.apply(teacher_variables, images, train=False)
      teacher_logits = jax.lax.stop_gradient(teacher_logits)

    def loss_fn(params):
      (_, out), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        images,
        train=True,
        mutable=['batch_stats'],
        rngs={'drop_path': drop_path_rng},
      )
      if teacher is None:
        loss = two_head_loss(out, targets, dist_head_weight)
      else:
        loss = distillation_loss(
          out,
          targets,
          teacher_logits,
          kind=kind,
          alpha=config.distillation.alpha,
          tau=config.distillation.tau,
        )
      return loss, (updates['batch_stats'], {})

    return _update(state, batch, loss_fn)

  def _update(state: TrainState, batch: Batch, loss_fn) -> tuple[TrainState, Metrics]:

    (loss, (batch_stats, extra)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = global_norm(grads)
    update_ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    if state.ema:
      new = new.replace(ema=ema_update(state.ema, new.variables(), ema_decay))
    # A non-finite update never reaches the state: the old weights, Adam moments, BN statistics
    # and EMA are kept. (The selects are not free on GPUs: an H100 profile of B's step shows them
    # as 633 small kernels, ~1.2 ms of 82.8; docs/benchmarks/h100_bf16_profile_b_train.json.)
    # Integer leaves, the optimizer's step counts, still advance so that the lr schedule stays
    # on the step.
    # Whether the run then stops (default) or goes on is the host's decision, at the next check.
    new = jax.tree.map(
      lambda n, o: n if jnp.issubdtype(n.dtype, jnp.integer) else jnp.where(update_ok, n, o),
      new,
      state,
    )
    new = new.replace(
      step=state.step + 1, skipped_updates=state.skipped_updates + (~update_ok).astype(jnp.int32)
    )

    metrics = {
      'loss': loss,
      'grad_norm': grad_norm,
      'param_norm': global_norm(new.params),
      'lr': jnp.asarray(schedule(state.step), jnp.float32),
      'update_ok': update_ok,
      'skipped_updates': new.skipped_updates,
      **extra,
    }
    if 'num_skipped' in batch:
      metrics['skipped_records'] = jnp.sum(batch['num_skipped'])
    return new, metrics

  return train_step


# ------------------------------------------------------------------------------------------------
# Eval step.
# ------------------------------------------------------------------------------------------------


def classification_sums(
  logits: jax.Array, labels: jax.Array, mask: jax.Array, top_k: int = 5
) -> dict[str, jax.Array]:
  """Masked sums over a batch: correct top-1 / top-k (int32) and cross-entropy (float32).

  Ties go to the lower class index (as argmax and lax.top_k). Rows with mask False (padding)
  contribute nothing, so summing over all batches of a split gives exact split-level counts.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(bool)
  k = min(top_k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  hit = top == labels[:, None]
  loss = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=-1)[:, 0]
  return {
    'top1_correct': jnp.sum(hit[:, 0] & mask, dtype=jnp.int32),
    'top5_correct': jnp.sum(jnp.any(hit, axis=-1) & mask, dtype=jnp.int32),
    'loss_sum': jnp.sum(jnp.where(mask, loss, 0.0)),
  }


def make_eval_step(model: nn.Module) -> Callable[[dict[str, Any], Batch, Metrics], Metrics]:
  """Returns `eval_step(weights, batch, sums) -> sums`, accumulating on the device.

  `weights`: {name: {'params', 'batch_stats'}}, e.g. {'': raw, 'ema': ema}; every set sees the
  same batch. `batch`: image uint8 [B, H, W, 3], label int32 [B], mask bool [B], optionally
  num_skipped int32 [B]. `sums` (from `init_eval_sums`): `<name>/top1_correct`, ...,
  plus `num_examples` and `skipped_records`.
  """

  def eval_step(weights: dict[str, Any], batch: Batch, sums: Metrics) -> Metrics:
    images = data_lib.normalize(batch['image'])
    new = {
      'num_examples': jnp.sum(batch['mask'], dtype=jnp.int32),
      'skipped_records': jnp.sum(
        batch.get('num_skipped', jnp.zeros((), jnp.int32)), dtype=jnp.int32
      ),
    }
    for name, variables in weights.items():
      logits, _ = model.apply(variables, images, train=False)
      for key, value in classification_sums(logits, batch['label'], batch['mask']).items():
        new[f'{name}/{key}'] = value
    return jax.tree.map(jnp.add, sums, new)

  return eval_step


def init_eval_sums(weight_names: list[str]) -> Metrics:
  """Zero accumulators matching `make_eval_step`'s output."""
  sums = {'num_examples': jnp.zeros((), jnp.int32), 'skipped_records': jnp.zeros((), jnp.int32)}
  for name in weight_names:
    sums[f'{name}/top1_correct'] = jnp.zeros((), jnp.int32)
    sums[f'{name}/top5_correct'] = jnp.zeros((), jnp.int32)
    sums[f'{name}/loss_sum'] = jnp.zeros((), jnp.float32)
  return sums


def summarize_eval(sums: Mapping[str, Any]) -> dict[str, float]:
  """Host-side split metrics from fetched sums: `<prefix>top1`, `top5`, `loss` per weight set.

  Raw weights get no prefix (`top1`), the EMA `ema_` (`ema_top1`).
  """
  count = int(sums['num_examples'])
  out: dict[str, float] = {'num_examples': count, 'skipped_records': int(sums['skipped_records'])}
  for key, value in sums.items():
    if '/' not in key:
      continue
    name, what = key.split('/')
    prefix = f'{name}_' if name else ''
    metric = {'top1_correct': 'top1', 'top5_correct': 'top5', 'loss_sum': 'loss'}[what]
    out[prefix + metric] = float(value) / max(count, 1)
  return out
