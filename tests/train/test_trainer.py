"""End-to-end training on 8 simulated devices: real TFDS imagenet2012 builder + grain pipeline,
resume after a kill, non-finite losses, eval mode, the command line."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.train.hooks import NanParameter, sigterm_after
from tests.train.smoke import NUM_TRAIN_STEPS, smoke_config
from vcmamba_jax import checkpoint, train
from vcmamba_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _train_rows(workdir: str) -> dict[int, dict]:
  """step -> the train metrics row of that step (the last one written, after a resume)."""
  return {row['step']: row for row in read_metrics(workdir) if 'train/loss' in row}


def _eval_row(workdir: str) -> dict:
  return [row for row in read_metrics(workdir) if 'eval/top1' in row][-1]


def test_smoke_run_on_8_devices_learns(reference_run):
  assert jax.device_count() == 8
  rows = _train_rows(reference_run)
  assert sorted(rows) == list(range(1, NUM_TRAIN_STEPS + 1))
  losses = [rows[s]['train/loss'] for s in sorted(rows)]
  # 1000-way heads start near ln(1000) = 6.9; only 10 classes occur, which the heads learn fast.
  assert losses[0] > 6.0
  assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
  last = rows[NUM_TRAIN_STEPS]
  for key in (
    'train/lr',
    'train/grad_norm',
    'train/param_norm',
    'train/img_per_sec',
    'train/img_per_sec_per_device',
    'train/step_time',
    'train/skipped_records',
  ):
    assert key in last and math.isfinite(last[key]), key
  # The fake ImageNet holds 2 undecodable JPEGs; the pipeline skips and counts them.
  assert sum(rows[s]['train/skipped_records'] for s in rows) >= 1
  assert sorted(
    checkpoint.create_manager(reference_run, max_to_keep=3, read_only=True).all_steps()
  ) == [4, 8]
  evaluation = _eval_row(reference_run)
  assert evaluation['step'] == NUM_TRAIN_STEPS and evaluation['eval/num_examples'] == 20
  expected_keys = {'eval/top1', 'eval/top5', 'eval/loss', 'eval/ema_top1', 'eval/ema_loss'}
  assert expected_keys <= set(evaluation)
  assert os.path.exists(os.path.join(reference_run, 'config.json'))
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(reference_run))


def test_kill_and_resume_reproduces_the_uninterrupted_run(reference_run, imagenet_dir, tmp_path):
  config = smoke_config(imagenet_dir)
  workdir = str(tmp_path)
  first = train.run(config, workdir, hooks=sigterm_after(3))  # saves step 3, returns
  assert first['preempted']
  assert checkpoint.create_manager(workdir, max_to_keep=3, read_only=True).latest_step() == 3
  assert max(_train_rows(workdir)) == 3
  second = train.run(config, workdir)  # the same command again: resumes at step 4
  assert not second.get('preempted')

  resumed, reference = _train_rows(workdir), _train_rows(reference_run)
  assert sorted(resumed) == sorted(reference)
  for step in reference:  # same data order and randomness: identical numbers, step for step
    for key in ('train/loss', 'train/grad_norm', 'train/param_norm', 'train/lr'):
      assert resumed[step][key] == reference[step][key], (step, key)
  assert _eval_row(workdir)['eval/top1'] == _eval_row(reference_run)['eval/top1']
  assert _eval_row(workdir)['eval/loss'] == _eval_row(reference_run)['eval/loss']


def test_eval_mode_on_a_checkpoint_from_the_command_line(reference_run, imagenet_dir):
  result = subprocess.run(
    [
      sys.executable,
      'main.py',
      '--config=vcmamba_jax/configs/vcmamba_s.py:smoke',
      f'--workdir={reference_run}',
      '--config.mode=eval',
      '--config.data.dataset=imagenet2012',
      f'--config.data.data_dir={imagenet_dir}',
      '--config.model.num_classes=1000',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [row for row in read_metrics(reference_run) if 'eval/source' in row]
  assert rows, result.stderr[-3000:]
  evaluated, trained = rows[-1], _eval_row(reference_run)
  assert evaluated['step'] == NUM_TRAIN_STEPS
  for key in ('eval/top1', 'eval/top5', 'eval/loss', 'eval/ema_top1', 'eval/num_examples'):
    assert evaluated[key] == pytest.approx(trained[key], rel=1e-6, abs=1e-6), key


def test_unknown_config_key_is_an_error(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      'main.py',
      '--config=vcmamba_jax/configs/digits.py',
      f'--workdir={tmp_path}',
      '--config.optimizer.learning_rate=1.0',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode != 0
  assert 'learning_rate' in result.stderr
  assert not os.listdir(tmp_path)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(imagenet_dir, tmp_path):
  # A NaN weight after step 5 makes the loss of step 6 NaN. Metrics are checked every 4 steps
  # here: it is found at step 8.
  config = smoke_config(imagenet_dir, log_every_steps=4)
  workdir = str(tmp_path)
  with pytest.raises(
    train.TrainingDivergedError, match=r'loss became nan between steps 5 and 8 \(first at step 6'
  ):
    train.run(config, workdir, hooks=train.Hooks(edit_state=NanParameter(after=5)))
  manager = checkpoint.create_manager(workdir, max_to_keep=3, read_only=True)
  assert manager.all_steps() == [4]  # step 8 (after the NaN) was never written
  weights = checkpoint.read_training_weights(os.path.join(workdir, 'checkpoints', '4'))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(weights))
  assert max(_train_rows(workdir)) == 4  # nothing logged for the bad interval


def test_skip_nonfinite_updates_continues(imagenet_dir, tmp_path):
  config = smoke_config(imagenet_dir, skip_nonfinite_updates=True)
  workdir = str(tmp_path)
  fault = NanParameter(after=5, restore_after=6)  # a transient fault: step 6 alone sees it
  result = train.run(config, workdir, hooks=train.Hooks(edit_state=fault))
  rows = _train_rows(workdir)
  assert max(rows) == NUM_TRAIN_STEPS
  assert rows[5]['train/skipped_updates'] == 0
  assert rows[6]['train/skipped_updates'] == 1 and rows[6]['train/loss'] == 'nan'
  assert fault.state_unchanged_while_poisoned  # the update of step 6 was not applied
  assert rows[7]['train/skipped_updates'] == 1 and math.isfinite(rows[7]['train/loss'])
  assert rows[8]['train/skipped_updates'] == 1 and math.isfinite(rows[8]['train/loss'])
  assert math.isfinite(result['eval/top1'])
