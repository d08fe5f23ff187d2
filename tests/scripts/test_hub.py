"""Weights from the Hugging Face Hub (offline, against a prepared cache), save_pretrained folders,
create_model(pretrained=...), list_models and predict.py on a Hub path."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import vcmamba_jax
from tests.hub_cache import add_to_hub_cache
from tests.scripts.conftest import NANO, NANO_SIZE, load_script
from vcmamba_jax import convert
from vcmamba_jax.convert import hub, registry

OFFICIAL_B = 'hf-hub:SLDGroup/VCMamba/VCMamba-B.pth'


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, no_network):
  """An empty Hub cache in HF_HUB_CACHE, HF_HUB_OFFLINE=1 and no network."""
  cache = tmp_path / 'hf_cache'
  cache.mkdir()
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  yield cache
  assert no_network == []


def assert_same_variables(got, want):
  flat_got = dict(jax.tree_util.tree_leaves_with_path(got))
  flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
  assert flat_got.keys() == flat_want.keys()
  for path, value in flat_want.items():
    np.testing.assert_array_equal(np.asarray(flat_got[path]), value, err_msg=str(path))


def test_parse_hub_path():
  parse = hub.parse_hub_path
  assert parse(OFFICIAL_B) == hub.HubPath('SLDGroup/VCMamba', 'VCMamba-B.pth', None)
  assert parse('hf-hub:a/b/sub/w.safetensors@v1.0') == hub.HubPath(
    'a/b', 'sub/w.safetensors', 'v1.0'
  )
  assert parse('hf-hub:a/b@0123abc/w.pth') == hub.HubPath('a/b', 'w.pth', '0123abc')
  assert parse('hf-hub:timm/regnety_160.deit_in1k') == hub.HubPath('timm/regnety_160.deit_in1k')
  assert str(parse('hf-hub:user/repo@dev')) == 'hf-hub:user/repo@dev'
  for bad in ('hf-hub:justaname', 'hf-hub:a/b@x/f@y', 'VCMamba-B.pth'):
    with pytest.raises(convert.HubError):
      parse(bad)


def test_official_path_loads_from_the_cache_at_main_and_at_a_commit(
  hub_cache, nano_pth, nano_variables
):
  commit = add_to_hub_cache(hub_cache, 'SLDGroup/VCMamba', {'VCMamba-B.pth': nano_pth})
  model, variables = vcmamba_jax.load_pretrained(OFFICIAL_B, NANO)
  assert (model.num_classes, model.img_size, model.widths) == (1000, NANO_SIZE, (16, 32, 48, 64))
  assert_same_variables(variables, nano_variables)
  path = convert.resolve_hub_path(f'{OFFICIAL_B}@{commit}')
  assert path == str(hub_cache / f'models--SLDGroup--VCMamba/snapshots/{commit}/VCMamba-B.pth')


def test_create_model_pretrained_uses_the_official_hub_path(
  hub_cache, nano_pth, nano_variables, monkeypatch
):
  assert vcmamba_jax.pretrained_weights('vcmamba_b') == OFFICIAL_B
  assert isinstance(vcmamba_jax.create_model(NANO), vcmamba_jax.models.VCMamba)
  add_to_hub_cache(hub_cache, 'SLDGroup/VCMamba', {'VCMamba-B.pth': nano_pth})
  # The nano test weights stand in for B's 125 MB under the official name.
  monkeypatch.setitem(registry.PRETRAINED_WEIGHTS, NANO, OFFICIAL_B)
  model, variables = vcmamba_jax.create_model(NANO, pretrained=True, img_size=NANO_SIZE)
  assert_same_variables(variables, nano_variables)
  # A new label set and resolution: heads re-initialised, pos_embed resized, the rest kept.
  model, variables = vcmamba_jax.create_model(NANO, pretrained=True, num_classes=5, img_size=96)
  params = variables['params']
  assert params['head']['kernel'].shape == (64, 5)
  assert params['stage4']['pos_embed'].shape == (1, 3, 3, 64)
  np.testing.assert_array_equal(
    params['stem']['conv1']['kernel'], nano_variables['params']['stem']['conv1']['kernel']
  )
  with pytest.raises(ValueError, match='no official weights'):
    vcmamba_jax.create_model('vcmamba_nano_x', pretrained=True)


def test_save_pretrained_folder_uploads_and_loads_back_from_the_hub_path(
  hub_cache, nano_variables, tmp_path
):
  folder = tmp_path / 'upload'
  convert.save_pretrained(
    folder, nano_variables, NANO, repo_id='someone/vcmamba-nano', num_classes=1000, img_size=64
  )
  assert sorted(p.name for p in folder.iterdir()) == [
    'README.md',
    'config.json',
    'model.safetensors',
  ]
  config = json.loads((folder / 'config.json').read_text())
  assert config['library_name'] == 'vcmamba_jax'
  assert config['architecture'] == NANO
  assert config['model_kwargs'] == {'num_classes': 1000, 'img_size': 64}
  card = (folder / 'README.md').read_text()
  assert card.startswith('---\nlibrary_name: vcmamba_jax\n')
  assert "load_pretrained('hf-hub:someone/vcmamba-nano')" in card
  # The weights file holds the authors' PyTorch names, so it loads as a plain .safetensors too.
  state = convert.read_state_dict(folder / 'model.safetensors')
  assert state['patch_embed.0.weight'].shape == (8, 3, 3, 3)

  _, variables = vcmamba_jax.load_pretrained(folder)
  assert_same_variables(variables, nano_variables)
  commit = add_to_hub_cache(
    hub_cache,
    'someone/vcmamba-nano',
    {p.name: p for p in folder.iterdir()},
    refs=('main', 'v1'),
  )
  for path in ('hf-hub:someone/vcmamba-nano', 'hf-hub:someone/vcmamba-nano@v1'):
    model, variables = vcmamba_jax.load_pretrained(path, NANO)
    assert (model.num_classes, model.img_size) == (1000, 64)
    assert_same_variables(variables, nano_variables)
  assert convert.resolve_hub_path('hf-hub:someone/vcmamba-nano').endswith(f'snapshots/{commit}')


def test_timm_repositories_resolve_to_their_weights_file(hub_cache):
  timm_config = json.dumps({'architecture': 'regnety_160', 'num_classes': 1000}).encode()
  add_to_hub_cache(
    hub_cache,
    'timm/regnety_160.deit_in1k',
    {'config.json': timm_config, 'model.safetensors': b'weights'},
  )
  path = convert.resolve_hub_path('hf-hub:timm/regnety_160.deit_in1k')
  assert path.endswith(
    'models--timm--regnety_160.deit_in1k/snapshots/' + path.split('/')[-2] + '/model.safetensors'
  )
  add_to_hub_cache(hub_cache, 'timm/old_model', {'pytorch_model.bin': b'weights'})
  assert convert.resolve_hub_path('hf-hub:timm/old_model').endswith('/pytorch_model.bin')


def test_not_in_the_cache_offline_says_so_and_how_to_get_it(hub_cache, nano_pth):
  add_to_hub_cache(hub_cache, 'SLDGroup/VCMamba', {'VCMamba-B.pth': nano_pth})
  with pytest.raises(convert.HubError) as error:
    vcmamba_jax.load_pretrained('hf-hub:SLDGroup/VCMamba/VCMamba-S.pth')
  message = str(error.value)
  assert 'VCMamba-S.pth (revision main) is not in the Hugging Face cache' in message
  assert str(hub_cache) in message and 'HF_HUB_OFFLINE is set' in message
  assert '`hf download SLDGroup/VCMamba VCMamba-S.pth`' in message
  with pytest.raises(convert.HubError, match=r'none of config.json, model.safetensors, .* cache'):
    vcmamba_jax.load_pretrained('hf-hub:nobody/nothing')
  with pytest.raises(convert.HubError, match=r'revision v9\) is not in the Hugging Face cache'):
    vcmamba_jax.load_pretrained(f'{OFFICIAL_B}@v9')


def test_list_models():
  assert vcmamba_jax.list_models('vcmamba*') == [
    'vcmamba_b',
    'vcmamba_m',
    'vcmamba_nano',
    'vcmamba_s',
  ]
  assert 'regnety_160' in vcmamba_jax.list_models()
  assert vcmamba_jax.list_models(pretrained=True) == [
    'regnety_160',
    'vcmamba_b',
    'vcmamba_m',
    'vcmamba_s',
  ]
  assert vcmamba_jax.pretrained_weights('regnety_160') == 'hf-hub:timm/regnety_160.deit_in1k'
  assert vcmamba_jax.list_models('vcmamba_[sb]') == ['vcmamba_b', 'vcmamba_s']


def test_predict_reads_hub_paths(hub_cache, capsys):
  predict = load_script('predict')
  assert predict.main(['--weights', 'hf-hub:SLDGroup/VCMamba/nope.pth', '--image', 'x.jpg']) == 1
  assert 'nope.pth (revision main) is not in the Hugging Face cache' in capsys.readouterr().err


def test_predict_without_weights_needs_a_model_with_official_weights(capsys):
  predict = load_script('predict')
  with pytest.raises(SystemExit) as info:
    predict.main(['--model', NANO, '--image', 'x.jpg'])
  assert info.value.code == 2
  assert 'give --weights, or --model one of' in capsys.readouterr().err
  args = predict.parse_args(['--model', 'vcmamba_s', '--image', 'x.jpg'])
  assert args.weights == 'hf-hub:SLDGroup/VCMamba/VCMamba-S.pth'
