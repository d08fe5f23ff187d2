"""Evaluation counts every validation example exactly once: masked padding, exact top-k."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vcmamba_jax import data
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.configs import digits
from vcmamba_jax.train import builders, steps, trainer


def test_classification_sums_on_a_hand_built_batch():
  logits = jnp.array(
    [
      [9.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 0: top-1
      [1.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0],  # label 6: rank 6 -> neither
      [1.0, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0],  # label 5: rank 5 -> top-5 only
      [
        5.0,
        5.0,
        0.0,
        0.0,
        0.0,
        0.0,
        0.0,
      ],  # label 1: tie with class 0, lower index wins -> top-5 only
      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 9.0],  # label 6: top-1, but padding (mask False)
      [9.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 3: padding
    ]
  )
  labels = jnp.array([0, 6, 5, 1, 6, 3])
  mask = jnp.array([True, True, True, True, False, False])
  sums = jax.device_get(steps.classification_sums(logits, labels, mask))
  assert int(sums['top1_correct']) == 1
  assert int(sums['top5_correct']) == 3
  log_softmax = np.asarray(jax.nn.log_softmax(logits))
  expected_loss = -sum(log_softmax[i, int(labels[i])] for i in range(4))
  assert float(sums['loss_sum']) == pytest.approx(expected_loss, rel=1e-6)

  summary = steps.summarize_eval(
    {
      'num_examples': 4,
      'skipped_records': 0,
      '/top1_correct': 1,
      '/top5_correct': 3,
      '/loss_sum': 2.0,
      'ema/top1_correct': 2,
      'ema/top5_correct': 4,
      'ema/loss_sum': 1.0,
    }
  )
  assert summary == {
    'num_examples': 4,
    'skipped_records': 0,
    'top1': 0.25,
    'top5': 0.75,
    'loss': 0.5,
    'ema_top1': 0.5,
    'ema_top5': 1.0,
    'ema_loss': 0.25,
  }


def test_sharded_eval_over_a_padded_split_is_exact():
  config = digits.get_config()
  config.eval_batch_size = 64  # 360 validation images: 5 full batches + 40 real rows + 24 padding
  mesh = sharding_lib.create_mesh()
  assert mesh.devices.size == 8
  model = builders.build_model(config)
  variables = jax.jit(
    lambda: model.init({'params': jax.random.PRNGKey(3)}, jnp.zeros((1, 32, 32, 3)))
  )()
  shardings = sharding_lib.state_shardings(mesh, variables)
  eval_step = builders.jit_eval_step(model, mesh, {'': shardings, 'ema': shardings})
  dataset = builders.make_eval_dataset(config)
  results = trainer.run_evaluation(eval_step, {'': variables, 'ema': variables}, dataset, mesh)

  # The same numbers on the host, one example at a time from the unpadded rows.
  batches = list(iter(dataset))
  assert len(batches) == 6
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  indices = np.concatenate([b['index'][b['mask']] for b in batches])
  assert sorted(indices) == list(range(360))  # every example once
  logits = np.asarray(jax.jit(lambda x: model.apply(variables, data.normalize(x))[0])(images))
  correct = int(np.sum(np.argmax(logits, -1) == labels))
  assert results['num_examples'] == 360
  assert round(results['top1'] * 360) == correct
  assert results['ema_top1'] == results['top1'] and results['ema_loss'] == results['loss']
  log_probs = np.asarray(jax.nn.log_softmax(logits))
  assert results['loss'] == pytest.approx(-np.mean(log_probs[np.arange(360), labels]), rel=1e-5)
