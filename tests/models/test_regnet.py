"""RegNet (the DeiT teacher) against timm's PyTorch model: generator, names, shapes, logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vcmamba_jax
from vcmamba_jax.convert import CheckpointError
from vcmamba_jax.convert import regnet as regnet_convert
from vcmamba_jax.models import regnet

torch = pytest.importorskip('torch')
timm = pytest.importorskip('timm')
timm_regnet = pytest.importorskip('timm.models.regnet')

SMALL = 'regnety_002'


def _randomize_batchnorms(module, seed: int = 0) -> None:
  """timm zero-initialises the last BN of every block (and BNs start as the identity): give
  every BN weight, bias and running statistic random values so that each one matters."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in module.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
        m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=gen))
        m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


@pytest.fixture(scope='module')
def timm_small():
  torch.manual_seed(0)
  model = timm.create_model(SMALL, pretrained=False).eval()
  _randomize_batchnorms(model)
  return model


@pytest.fixture(scope='module')
def deit_checkpoint(timm_small, tmp_path_factory):
  """timm's model saved as DeiT saves its teacher: {'model': state_dict} in a .pth."""
  path = tmp_path_factory.mktemp('regnet') / f'{SMALL}-deit.pth'
  torch.save({'model': timm_small.state_dict()}, path)
  return str(path)


@pytest.fixture(scope='module')
def loaded(deit_checkpoint):
  return vcmamba_jax.load_pytorch_weights(deit_checkpoint, SMALL)


@pytest.mark.parametrize('name', sorted(regnet.VARIANTS))
def test_generated_stages_equal_timms(name):
  per_stage, common = timm_regnet.RegNet._get_stage_args(None, timm_regnet.model_cfgs[name])
  ours = regnet.stage_specs(regnet.VARIANTS[name])
  assert [(s.depth, s.width, s.group_size) for s in ours] == [
    (a['depth'], a['out_chs'], a['group_size']) for a in per_stage
  ]
  assert regnet.VARIANTS[name].se_ratio == common['se_ratio']


@pytest.mark.parametrize('size', [(64, 64), (72, 50)], ids=['square', 'non_square'])
def test_logits_and_features_match_timm_from_a_deit_checkpoint(timm_small, loaded, size):
  model, variables = loaded
  images = np.random.RandomState(1).randn(2, 3, *size).astype(np.float32)
  with torch.no_grad():
    ref_logits = timm_small(torch.from_numpy(images)).numpy()
    ref_features = timm_small.forward_intermediates(
      torch.from_numpy(images), intermediates_only=True
    )
  logits, out = jax.jit(lambda v, x: model.apply(v, x, train=False))(
    variables, jnp.asarray(images.transpose(0, 2, 3, 1))
  )
  scale = np.abs(ref_logits).max()
  np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=1e-4 * scale)
  for name, ref in zip(('stem', 'stage1', 'stage2', 'stage3', 'stage4'), ref_features):
    ref = ref.numpy().transpose(0, 2, 3, 1)
    assert out[name].shape == ref.shape, name
    np.testing.assert_allclose(np.asarray(out[name]), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  pooled = ref_features[-1].numpy().mean(axis=(2, 3))
  np.testing.assert_allclose(np.asarray(out['pre_logits']), pooled, rtol=0, atol=1e-5)


def test_regnety_160_variables_equal_timms_state_dict():
  reference = timm.create_model('regnety_160', pretrained=False, device='meta').state_dict()
  expected = {k: tuple(v.shape) for k, v in reference.items() if 'num_batches_tracked' not in k}
  ours = regnet_convert.expected_state_dict_shapes(vcmamba_jax.create_model('regnety_160'))
  assert ours == expected
  params = sum(int(np.prod(s)) for k, s in ours.items() if 'running_' not in k)
  assert params == 83_590_140  # timm's regnety_160 parameter count


def test_export_round_trips_through_timm_and_safetensors(timm_small, loaded, tmp_path):
  from safetensors.numpy import save_file

  _, variables = loaded
  state = regnet_convert.to_pytorch_state_dict(variables)
  fresh = timm.create_model(SMALL, pretrained=False)
  fresh.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=True)
  for key, value in timm_small.state_dict().items():
    np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy(), err_msg=key)
  path = tmp_path / 'model.safetensors'  # the layout of timm's Hub files
  save_file({k: v for k, v in state.items() if 'num_batches_tracked' not in k}, str(path))
  _, again = vcmamba_jax.load_pytorch_weights(path, SMALL)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_strict_loading_names_the_offending_keys(timm_small):
  state = {k: v.numpy() for k, v in timm_small.state_dict().items()}
  model = vcmamba_jax.create_model(SMALL)
  broken = dict(state)
  del broken['s2.b1.se.fc1.bias']
  broken['s1.b1.extra.weight'] = np.zeros(3, np.float32)
  broken['s3.b1.conv1.conv.weight'] = np.zeros((1, 1, 1, 1), np.float32)
  with pytest.raises(CheckpointError) as error:
    regnet_convert.state_dict_to_variables(broken, model, source='broken.pth')
  message = str(error.value)
  assert 'broken.pth does not fit' in message
  assert 'missing keys (1): s2.b1.se.fc1.bias' in message
  assert 'unexpected keys (1): s1.b1.extra.weight' in message
  assert 's3.b1.conv1.conv.weight: checkpoint (1, 1, 1, 1) vs model' in message
  with pytest.raises(
    CheckpointError, match="looks like a regnety_002 checkpoint; pass name='regnety_002'"
  ):
    regnet_convert.state_dict_to_variables(state, vcmamba_jax.create_model('regnety_004'))
  with pytest.raises(CheckpointError, match='pass num_classes=1000'):
    regnet_convert.state_dict_to_variables(state, vcmamba_jax.create_model(SMALL, num_classes=10))
