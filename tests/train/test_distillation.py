"""DeiT distillation: the loss against the authors' PyTorch formula, the teacher's start-up
errors and placement, and a smoke run with a small random teacher (learns, resumes exactly, keeps
the teacher out of the optimizer state and the checkpoints). The benchmark with a teacher:
tests/train/test_benchmark.py."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

import vcmamba_jax
from tests.hub_cache import add_to_hub_cache
from tests.train.hooks import sigterm_after
from tests.train.smoke import NUM_TRAIN_STEPS, smoke_config
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax import train
from vcmamba_jax.convert import regnet as regnet_convert
from vcmamba_jax.train import distillation, steps
from vcmamba_jax.train.metrics import read_metrics

torch = pytest.importorskip('torch')

# A RegNet that is cheap at 32 px; random weights (a teacher that teaches nothing, but runs the
# whole production path: loading, placement, the teacher's forward inside the step).
SMALL_TEACHER = {
  'distillation.type': 'soft',
  'distillation.teacher': 'regnety_002',
  'distillation.teacher_path': 'random',
}


# ------------------------------------------------------------------------------------------------
# The loss.
# ------------------------------------------------------------------------------------------------


def _deit_distillation_loss(head, dist, teacher, targets, kind, alpha, tau):
  """DeiT's losses.DistillationLoss.forward with SoftTargetCrossEntropy as base criterion,
  written with torch as in the authors' code."""
  import torch.nn.functional as F

  base_loss = torch.sum(-targets * F.log_softmax(head, dim=-1), dim=-1).mean()
  if kind == 'soft':
    T = tau
    distillation_loss = (
      F.kl_div(
        F.log_softmax(dist / T, dim=1),
        F.log_softmax(teacher / T, dim=1),
        reduction='sum',
        log_target=True,
      )
      * (T * T)
      / dist.numel()
    )
  else:
    distillation_loss = F.cross_entropy(dist, teacher.argmax(dim=1))
  return base_loss * (1 - alpha) + distillation_loss * alpha


@pytest.mark.parametrize('kind', ['soft', 'hard'])
@pytest.mark.parametrize('alpha,tau', [(0.5, 1.0), (0.3, 2.5)])
def test_loss_equals_the_authors_formula(kind, alpha, tau):
  head = np.array(
    [[2.0, -1.0, 0.5, 0.0, 1.5], [0.1, 0.2, 0.3, 0.4, 0.5], [-3.0, 2.0, 1.0, 0.0, -1.0]],
    np.float32,
  )
  dist = np.array(
    [[1.0, 0.0, -1.0, 2.0, 0.5], [3.0, -2.0, 0.0, 1.0, 0.0], [0.5, 0.5, -0.5, 4.0, -2.0]],
    np.float32,
  )
  teacher = np.array(
    [[0.0, 3.0, 1.0, -1.0, 2.0], [1.0, 1.0, 5.0, -2.0, 0.0], [2.0, -1.0, 0.0, 0.0, 6.0]],
    np.float32,
  )
  # Mixed, smoothed targets as mixup makes them: lam * onehot(a) + (1 - lam) * onehot(b) + eps.
  targets = np.full((3, 5), 0.02, np.float32)
  targets[0, 1] += 0.62
  targets[0, 3] += 0.28
  targets[1, 4] += 0.9
  targets[2, 0] += 0.45
  targets[2, 2] += 0.45
  expected = _deit_distillation_loss(
    *(torch.from_numpy(a) for a in (head, dist, teacher, targets)), kind, alpha, tau
  ).item()
  ours = steps.distillation_loss(
    {'logits_head': jnp.asarray(head), 'logits_dist': jnp.asarray(dist)},
    jnp.asarray(targets),
    jnp.asarray(teacher),
    kind=kind,
    alpha=alpha,
    tau=tau,
  )
  assert float(ours) == pytest.approx(expected, rel=1e-6, abs=1e-7)
  assert expected > 0.1  # a non-trivial value


# ------------------------------------------------------------------------------------------------
# Start-up errors.
# ------------------------------------------------------------------------------------------------


def test_missing_teacher_file_says_where_to_get_it_and_how_to_turn_it_off(imagenet_dir, tmp_path):
  missing = str(tmp_path / 'regnety_160-a5fe301d.pth')
  config = smoke_config(
    imagenet_dir, **{'distillation.type': 'soft', 'distillation.teacher_path': missing}
  )
  with pytest.raises(FileNotFoundError) as error:
    train.run(config, str(tmp_path / 'run'))
  message = str(error.value)
  assert missing in message and distillation.DEIT_TEACHER_URL in message
  assert 'timm/regnety_160.deit_in1k' in message
  assert '--config.distillation.type=none' in message
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')
  unset = smoke_config(imagenet_dir, **{'distillation.type': 'hard'})
  with pytest.raises(FileNotFoundError, match='teacher_path is not set'):
    distillation.load_teacher(unset, sharding_lib.create_mesh())
  for key, value, match in (
    ('type', 'kd', 'distillation.type'),
    ('teacher', 'resnet50', 'not a registered RegNet'),
    ('alpha', 1.5, 'alpha'),
  ):
    bad = smoke_config(imagenet_dir, **{**SMALL_TEACHER, f'distillation.{key}': value})
    with pytest.raises(ValueError, match=match):
      distillation.check_config(bad)


# ------------------------------------------------------------------------------------------------
# A smoke run with a small random teacher.
# ------------------------------------------------------------------------------------------------


def _train_rows(workdir: str) -> dict[int, dict]:
  return {row['step']: row for row in read_metrics(workdir) if 'train/loss' in row}


@pytest.fixture(scope='module')
def distilled_run(imagenet_dir, tmp_path_factory) -> str:
  workdir = str(tmp_path_factory.mktemp('distilled'))
  result = train.run(smoke_config(imagenet_dir, **SMALL_TEACHER), workdir)
  assert not result.get('preempted')
  return workdir


def test_distilled_smoke_run_learns_and_records_its_teacher(distilled_run):
  rows = _train_rows(distilled_run)
  assert sorted(rows) == list(range(1, NUM_TRAIN_STEPS + 1))
  losses = [rows[s]['train/loss'] for s in sorted(rows)]
  # 0.5 * CE(head) starts near 0.5 * ln(1000) = 3.45; KD against a near-uniform teacher is small.
  assert 3.0 < losses[0] < 5.0, losses
  assert np.mean(losses[-3:]) < losses[0] - 0.3, losses
  with open(os.path.join(distilled_run, distillation.METADATA_FILE)) as f:
    meta = json.load(f)
  assert meta['teacher'] == 'regnety_002' and meta['source'].startswith('random')
  assert len(meta['sha256']) == 64
  with open(os.path.join(distilled_run, 'config.json')) as f:
    assert json.load(f)['distillation']['type'] == 'soft'


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(path): tuple(x.shape) for path, x in leaves}


def test_teacher_is_not_in_the_optimizer_state_or_the_checkpoint(distilled_run):
  state_dir = os.path.join(distilled_run, 'checkpoints', str(NUM_TRAIN_STEPS), 'state')
  saved = ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree
  assert set(saved) == {
    'step',
    'params',
    'batch_stats',
    'opt_state',
    'ema',
    'rng',
    'skipped_updates',
  }
  params = _shapes(saved['params'])
  # The optimizer holds AdamW moments of exactly the student's parameters (and scalar counts).
  arrays = {k: s for k, s in _shapes(saved['opt_state']).items() if s}
  expected = {f"[0]['{m}']{k}": s for m in ('mu', 'nu') for k, s in params.items()}
  assert arrays == expected
  assert _shapes(saved['ema']['params']) == params
  teacher = regnet_convert.abstract_variables(vcmamba_jax.create_model('regnety_002'))
  teacher_keys = set(_shapes(teacher['params'])) | set(_shapes(teacher['batch_stats']))
  every_key = set(_shapes(saved))
  assert not any(k.endswith(t) for k in every_key for t in teacher_keys)


def test_distilled_run_resumes_with_identical_losses(distilled_run, imagenet_dir, tmp_path):
  config = smoke_config(imagenet_dir, **SMALL_TEACHER)
  workdir = str(tmp_path)
  assert train.run(config, workdir, hooks=sigterm_after(3))['preempted']
  assert not train.run(config, workdir).get('preempted')
  resumed, reference = _train_rows(workdir), _train_rows(distilled_run)
  assert sorted(resumed) == sorted(reference)
  for step in reference:
    for key in ('train/loss', 'train/grad_norm', 'train/param_norm'):
      assert resumed[step][key] == reference[step][key], (step, key)


def test_teacher_from_a_file_is_placed_replicated_or_fsdp_sharded(
  imagenet_dir, tmp_path, monkeypatch
):
  from safetensors.numpy import save_file

  config = smoke_config(imagenet_dir, **SMALL_TEACHER)
  mesh = sharding_lib.create_mesh()
  random_teacher = distillation.load_teacher(config, mesh)
  state = regnet_convert.to_pytorch_state_dict(random_teacher.variables)
  path = str(tmp_path / 'teacher.safetensors')
  save_file({k: v for k, v in state.items() if 'num_batches_tracked' not in k}, path)

  fsdp_mesh = sharding_lib.create_mesh(fsdp=8)
  overrides = {
    **SMALL_TEACHER,
    'distillation.teacher_path': path,
    'distillation.fsdp': True,
    'mesh.fsdp': 8,
    'mesh.fsdp_min_size': 2**12,
  }
  teacher = distillation.load_teacher(smoke_config(imagenet_dir, **overrides), fsdp_mesh)
  assert teacher.source == path and teacher.sha256 == distillation.file_sha256(path)
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(teacher.variables),
    jax.device_get(random_teacher.variables),
  )
  specs = [x.sharding.spec for x in jax.tree.leaves(teacher.variables)]
  assert any(sharding_lib.FSDP_AXIS in spec for spec in specs)
  assert all(x.sharding.spec == P() for x in jax.tree.leaves(random_teacher.variables))

  # timm's layout on the Hugging Face Hub (offline, from a prepared cache): 'hf-hub:owner/name'.
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf_cache'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  add_to_hub_cache(tmp_path / 'hf_cache', 'timm/regnety_002.test', {'model.safetensors': path})
  hub_config = smoke_config(
    imagenet_dir, **{**SMALL_TEACHER, 'distillation.teacher_path': 'hf-hub:timm/regnety_002.test'}
  )
  from_hub = distillation.load_teacher(hub_config, mesh)
  assert from_hub.source == 'hf-hub:timm/regnety_002.test' and from_hub.sha256 == teacher.sha256
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(from_hub.variables),
    jax.device_get(random_teacher.variables),
  )
