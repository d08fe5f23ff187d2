"""The converted golden weights reproduce the authors' PyTorch VCMamba-S (eval and train mode).

Bounds are those suggested in ../shared/golden/README.json.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import vcmamba_jax
from tests import golden
from vcmamba_jax.convert import to_pytorch_state_dict
from vcmamba_jax.models import PlainMamba2D

pytestmark = pytest.mark.usefixtures('highest_precision')

STAGES = {
  'stem': '__stem',
  'stage1': '__stage0',
  'stage2': '__stage1',
  'stage3': '__stage2',
  'stage4': '__stage3',
}


@pytest.fixture(scope='module')
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def eval_golden():
  golden.require_golden()
  return golden.load(golden.EVAL_NPZ)


@pytest.fixture(scope='module', params=['npz', 'pth'])
def converted(request, eval_golden, tmp_path_factory):
  """(model, variables) from the golden .npz and from the same weights written as a .pth."""
  if request.param == 'npz':
    return vcmamba_jax.load_pytorch_weights(golden.EVAL_NPZ, 'vcmamba_s')
  torch = pytest.importorskip('torch')
  path = tmp_path_factory.mktemp('pth') / 'vcmamba_s_seed0.pth'
  torch.save({k: torch.from_numpy(v) for k, v in golden.state_dict(eval_golden).items()}, path)
  return vcmamba_jax.load_pytorch_weights(path, 'vcmamba_s')


@pytest.fixture(scope='module')
def eval_outputs(converted, eval_golden):
  model, variables = converted
  images = jnp.asarray(golden.nchw_to_nhwc(eval_golden['__input']))
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=['intermediates']))
  (logits, out), state = apply(variables, images)
  mixer = state['intermediates']['stage4']['block4']['mamba']
  return logits, out, {name: np.asarray(values[0]) for name, values in mixer.items()}


def test_logits_match(eval_outputs, eval_golden):
  logits, out, _ = eval_outputs
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  for name, key in [
    ('logits', '__logits'),
    ('logits_head', '__logits_head'),
    ('logits_dist', '__logits_dist'),
  ]:
    value = logits if name == 'logits' else out[name]
    assert np.abs(np.asarray(value) - eval_golden[key]).max() <= 1e-4, name


def test_stage_outputs_match(eval_outputs, eval_golden):
  _, out, _ = eval_outputs
  for name, key in STAGES.items():
    actual = np.asarray(out[name]).transpose(0, 3, 1, 2)
    assert actual.shape == eval_golden[key].shape, name
    assert golden.rel_max_err(actual, eval_golden[key]) <= 2e-5, name
  assert out['pre_logits'].shape == (2, 288)


def test_mamba_mixer_and_scan_intermediates_match(eval_outputs, eval_golden):
  _, _, mixer = eval_outputs
  to_nchw = lambda x: x.transpose(0, 3, 1, 2)
  assert golden.rel_max_err(to_nchw(mixer['mixer_in']), eval_golden['__mamba0_in']) <= 2e-5
  assert golden.rel_max_err(to_nchw(mixer['mixer_out']), eval_golden['__mamba0_out']) <= 2e-5
  # [B, L, E] -> [B, E, L] as the kernel sees them.
  assert (
    golden.rel_max_err(mixer['scan_delta'].transpose(0, 2, 1), eval_golden['__mamba0_scan_delta'])
    <= 2e-5
  )
  assert (
    golden.rel_max_err(mixer['scan_C'].transpose(0, 2, 1), eval_golden['__mamba0_scan_C']) <= 2e-5
  )
  for k in range(4):
    for name in ('u', 'B', 'out'):
      actual = mixer[f'scan_{name}'][:, k].transpose(0, 2, 1)
      ref = eval_golden[f'__mamba0_scan{k}_{name}']
      assert golden.rel_max_err(actual, ref) <= 2e-5, (k, name)


def test_scan_A_matches(converted, eval_golden):
  _, variables = converted
  a_log = variables['params']['stage4']['block4']['mamba']['A_log']
  np.testing.assert_allclose(-np.exp(np.asarray(a_log)), eval_golden['__mamba0_scan_A'], rtol=1e-6)


def test_non_square_mixer_matches(converted, eval_golden):
  _, variables = converted
  mixer_vars = {c: variables[c]['stage4']['block4']['mamba'] for c in ('params', 'batch_stats')}
  x = jnp.asarray(golden.nchw_to_nhwc(eval_golden['__mamba0_ns_in']))
  y = PlainMamba2D().apply(mixer_vars, x, train=False)
  assert y.shape == (2, 5, 8, 288)
  assert (
    golden.rel_max_err(np.asarray(y).transpose(0, 3, 1, 2), eval_golden['__mamba0_ns_out']) <= 2e-5
  )


def test_bfloat16_close_to_float32(converted, eval_golden):
  model, variables = converted
  bf16_model = vcmamba_jax.create_model('vcmamba_s', dtype=jnp.bfloat16)
  images = jnp.asarray(golden.nchw_to_nhwc(eval_golden['__input']))
  logits, out = jax.jit(lambda v, x: bf16_model.apply(v, x))(variables, images)
  assert logits.dtype == jnp.float32 and out['stage3'].dtype == jnp.bfloat16
  ref = eval_golden['__logits']
  err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
  assert err <= 0.02, err
  assert err > 0  # really computed in bf16


# ---------------------------------------------------------------------------------------------
# Train mode: loss, gradients and BatchNorm running statistics after one step.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def train_results(eval_golden):
  train = golden.load(golden.TRAIN_NPZ)
  model, variables = vcmamba_jax.load_pytorch_weights(golden.EVAL_NPZ, 'vcmamba_s')
  images = jnp.asarray(golden.nchw_to_nhwc(train['__input']))
  labels = jnp.asarray(train['__labels'])

  def loss_fn(params, batch_stats):
    (_, out), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats}, images, train=True, mutable=['batch_stats']
    )
    ce = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, labels).mean()
    return 0.5 * ce(out['logits_head']) + 0.5 * ce(out['logits_dist']), (out, updates)

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (out, updates)), grads = grad_fn(variables['params'], variables['batch_stats'])
  return train, variables, float(loss), out, updates, grads


def test_train_loss_and_logits_match(train_results):
  train, _, loss, out, _, _ = train_results
  assert abs(loss - float(train['__loss'])) <= 5e-6
  assert np.abs(np.asarray(out['logits_head']) - train['__logits_head']).max() <= 1e-4
  assert np.abs(np.asarray(out['logits_dist']) - train['__logits_dist']).max() <= 1e-4


def test_train_gradients_match(train_results):
  train, _, _, _, _, grads = train_results
  zero_grad_keys = set(golden.readme()['train_mode']['zero_true_gradient_biases']['stored_keys'])
  grads_torch = to_pytorch_state_dict(grads)
  checked = 0
  for key in train:
    if not key.startswith('__grad::'):
      continue
    name = key[len('__grad::') :]
    ref, actual = train[key], grads_torch[name]
    assert actual.shape == ref.shape, name
    if name in zero_grad_keys:
      assert np.abs(actual).max() <= 1e-4, name
    else:
      assert golden.rel_max_err(actual, ref) <= 2e-4, name
    checked += 1
  assert checked == 386


def test_train_batchnorm_running_stats_match(train_results):
  train, variables, _, _, updates, _ = train_results
  after = to_pytorch_state_dict(
    {'params': variables['params'], 'batch_stats': updates['batch_stats']}
  )
  keys = [k for k in train if k.startswith('__bn_after::')]
  assert len(keys) == 30
  for key in keys:
    name = key[len('__bn_after::') :]
    assert golden.rel_max_err(after[name], train[key]) <= 1e-5, name
