"""Segmentation training through the shared trainer: the real TFDS builder on a generated fake
ADE20K download, the grain pipeline, 8 simulated devices; the loss falls, a preempted run
resumes with identical losses step for step, eval reports mIoU; eval mode on the checkpoint."""

from __future__ import annotations

import math
import os
import signal

import jax
import numpy as np
import pytest

from vcmamba_jax import train
from vcmamba_jax.configs import sem_fpn_vcmamba_s_ade20k
from vcmamba_jax.segmentation import ade20k
from vcmamba_jax.train.metrics import read_metrics

STEPS = 12


@pytest.fixture(scope='module')
def ade_dir(tmp_path_factory) -> str:
  root = tmp_path_factory.mktemp('ade')
  ade20k.write_fake_ade20k_manual_dir(root / 'manual', num_train=24, num_val=5, image_size=(48, 96))
  ade20k.prepare_ade20k(root / 'manual', root / 'tfds')
  return str(root / 'tfds')


def config(data_dir: str, **overrides):
  c = sem_fpn_vcmamba_s_ade20k.get_config('smoke')
  c.data.data_dir = data_dir
  c.log_every_steps = 1
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  c.lock()
  return c


def losses(workdir: str) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


@pytest.fixture(scope='module')
def reference(ade_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('seg_ref'))
  result = train.run(config(ade_dir), workdir)
  return workdir, result


def test_smoke_run_learns_and_reports_miou(reference):
  workdir, result = reference
  assert jax.device_count() == 8
  rows = losses(workdir)
  assert sorted(rows) == list(range(1, STEPS + 1))
  values = [rows[s] for s in sorted(rows)]
  assert np.mean(values[-3:]) < 0.8 * np.mean(values[:3]), values
  for key in ('eval/mIoU', 'eval/mAcc', 'eval/aAcc'):
    assert 0.0 <= result[key] <= 1.0, key
  assert result['eval/num_examples'] == 5
  assert math.isfinite(result['train/acc_seg'])
  assert 'eval/IoU/wall' in result  # per-class IoU, ADE20K names (class 1 occurs in the fake)


def test_resume_after_preemption_repeats_the_losses(ade_dir, reference, tmp_path):
  workdir = str(tmp_path)
  sigterm_after_6 = train.Hooks(
    after_step=lambda step: step == 6 and os.kill(os.getpid(), signal.SIGTERM)
  )
  first = train.run(config(ade_dir), workdir, hooks=sigterm_after_6)  # saves step 6, returns
  assert first.get('preempted')
  second = train.run(config(ade_dir), workdir)
  assert not second.get('preempted')
  want, got = losses(reference[0]), losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    assert got[step] == want[step], step
  assert second['eval/mIoU'] == reference[1]['eval/mIoU']


def test_eval_mode_on_the_checkpoint(ade_dir, reference, tmp_path):
  workdir, result = reference
  evaluated = train.run(config(ade_dir, mode='eval', eval_from=workdir), str(tmp_path))
  assert evaluated['eval/mIoU'] == pytest.approx(result['eval/mIoU'], abs=1e-12)
