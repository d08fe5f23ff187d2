"""PyTorch weight import/export: formats, strictness, clear errors, round trips."""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vcmamba_jax
from tests import golden
from vcmamba_jax.convert import (
  CheckpointError,
  guess_variant,
  load_pretrained,
  read_state_dict,
  save_pretrained,
  to_pytorch_state_dict,
  torch_key,
)


@pytest.fixture(scope='module')
def golden_state():
  golden.require_golden()
  with np.load(golden.EVAL_NPZ) as data:
    return golden.state_dict({k: data[k] for k in data.files})


@pytest.fixture(scope='module')
def nano_variables():
  model = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64)
  return jax.jit(lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 64, 64, 3))))()


def test_key_names_match_the_upstream_key_list(golden_state):
  keys_file = golden.REPO.parent / 'shared' / 'reference' / 'state_dict_keys_vcmamba_b.txt'
  model = vcmamba_jax.create_model('vcmamba_b')
  from vcmamba_jax.convert.pytorch import expected_state_dict_shapes

  ours = expected_state_dict_shapes(model)
  listed = {
    line.split()[0]
    for line in keys_file.read_text().splitlines()
    if line.strip() and not line.startswith('#')
  }
  assert set(ours) == {k for k in listed if not k.endswith('num_batches_tracked')}
  s_model = vcmamba_jax.create_model('vcmamba_s')
  expected = expected_state_dict_shapes(s_model)
  given = {k for k in golden_state if not k.endswith('num_batches_tracked')}
  assert set(expected) == given
  assert all(expected[k] == golden_state[k].shape for k in expected)
  assert (
    torch_key(('stage4', 'block4', 'mamba', 'in_norm', 'var'))
    == 'network.6.4.mamba.in_conv.1.running_var'
  )
  assert torch_key(('downsample4', 'proj', 'kernel')) == 'network.5.proj.weight'


def test_round_trip_is_identity(nano_variables, tmp_path):
  state = to_pytorch_state_dict(nano_variables, 'vcmamba_nano')
  assert state['pos_embed'].shape == (1, 64, 2, 2)
  assert state['network.0.0.layer_scale_2'].shape == (16, 1, 1)
  assert state['network.0.0.mlp.fc1.weight'].shape == (64, 16, 1, 1)
  assert state['network.6.2.mamba.x_proj.weight'].shape == (4 + 32, 128)
  assert state['patch_embed.0.weight'].shape == (8, 3, 3, 3)
  assert state['patch_embed.1.num_batches_tracked'].dtype == np.int64
  path = tmp_path / 'nano.npz'
  np.savez(path, **state)
  model, loaded = vcmamba_jax.load_pytorch_weights(path, 'vcmamba_nano')
  assert model.img_size == 64 and model.num_classes == 10  # inferred from the file
  jax.tree.map(np.testing.assert_array_equal, loaded, nano_variables)


def test_gradient_trees_map_without_batch_stats(nano_variables):
  grads = jax.tree.map(jnp.ones_like, nano_variables['params'])
  state = to_pytorch_state_dict(grads)
  assert 'patch_embed.1.running_mean' not in state
  assert state['head.weight'].shape == (10, 64)


def test_training_checkpoint_dict_pth_and_float16(golden_state, tmp_path):
  torch = pytest.importorskip('torch')
  state = {
    k: torch.from_numpy(v.astype(np.float16) if v.dtype == np.float32 else v)
    for k, v in golden_state.items()
  }
  checkpoint = {
    'model': state,
    'optimizer': {},
    'epoch': 299,
    'scaler': 'none',
    'args': argparse.Namespace(model='VCMamba_EfficientFormer_S', lr=1e-3),
  }
  path = tmp_path / 'checkpoint.pth'
  torch.save(checkpoint, path)
  model, variables = vcmamba_jax.load_pytorch_weights(path, 'vcmamba_s')
  assert variables['params']['head']['kernel'].dtype == jnp.float32
  np.testing.assert_array_equal(
    variables['params']['head']['kernel'], golden_state['head.weight'].T
  )


def test_pth_with_arbitrary_code_is_refused(tmp_path):
  torch = pytest.importorskip('torch')

  import fractions

  path = tmp_path / 'evil.pth'  # any class off the allow-list stands for arbitrary code
  torch.save({'model': {'x': torch.zeros(1)}, 'payload': fractions.Fraction(1, 3)}, path)
  with pytest.raises(CheckpointError) as info:
    read_state_dict(path)
  message = str(info.value)
  assert 'loading refused for safety' in message
  assert 'asks to import fractions.Fraction' in message  # the rejected global, not cut off
  assert 'weights_only' not in message  # no advice to turn the protection off


def test_safetensors(golden_state, tmp_path):
  from safetensors.numpy import save_file

  path = tmp_path / 'w.safetensors'
  save_file({k: np.ascontiguousarray(v) for k, v in golden_state.items()}, str(path))
  _, variables = vcmamba_jax.load_pytorch_weights(path, 'vcmamba_s')
  np.testing.assert_array_equal(
    variables['params']['stage4']['block4']['mamba']['D'], golden_state['network.6.4.mamba.D']
  )


def test_wrong_variant_is_named(golden_state, tmp_path):
  path = tmp_path / 's.npz'
  np.savez(path, **golden_state)
  assert guess_variant(golden_state) == 'vcmamba_s'
  with pytest.raises(CheckpointError, match='looks like a vcmamba_s checkpoint') as info:
    vcmamba_jax.load_pytorch_weights(path, 'vcmamba_b')
  assert 'pos_embed is' not in str(info.value)  # same 7x7 grid: no "7x7 vs 7x7" line


def test_missing_and_unexpected_keys_are_listed(golden_state, tmp_path):
  state = dict(golden_state)
  del state['network.6.4.mamba.D']
  state['network.6.4.mamba.gamma'] = np.ones(576, np.float32)
  path = tmp_path / 'broken.npz'
  np.savez(path, **state)
  with pytest.raises(CheckpointError) as info:
    vcmamba_jax.load_pytorch_weights(path, 'vcmamba_s')
  message = str(info.value)
  assert 'missing keys (1): network.6.4.mamba.D (576,)' in message
  assert 'unexpected keys (1): network.6.4.mamba.gamma (576,)' in message


def test_pos_embed_grid_mismatch_explains_img_size(golden_state, tmp_path):
  path = tmp_path / 's.npz'
  np.savez(path, **golden_state)
  with pytest.raises(
    CheckpointError, match='pos_embed is 7x7 but the model expects 8x8: pass img_size=224'
  ):
    vcmamba_jax.load_pytorch_weights(path, 'vcmamba_s', img_size=256)


@pytest.mark.parametrize('suffix', ['.pth', '.npz', '.safetensors'])
def test_corrupt_files_are_clear_errors(tmp_path, suffix):
  if suffix == '.pth':
    pytest.importorskip('torch')
  path = tmp_path / f'corrupt{suffix}'
  path.write_bytes(b'PK\x03\x04 this is not a checkpoint' * 10)
  with pytest.raises(CheckpointError, match='corrupt'):
    vcmamba_jax.load_pytorch_weights(path, 'vcmamba_s')


def test_unsupported_and_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError):
    read_state_dict(tmp_path / 'nope.pth')
  (tmp_path / 'w.h5').write_bytes(b'x')
  with pytest.raises(CheckpointError, match='unsupported checkpoint format'):
    read_state_dict(tmp_path / 'w.h5')


def test_exported_directory_round_trip_and_adaptation(nano_variables, tmp_path):
  directory = save_pretrained(
    tmp_path / 'export', nano_variables, 'vcmamba_nano', num_classes=10, img_size=64
  )
  model, variables = load_pretrained(directory)
  assert (model.num_classes, model.img_size) == (10, 64)
  jax.tree.map(np.testing.assert_array_equal, variables, nano_variables)

  model, variables = load_pretrained(directory, img_size=96, num_classes=5, reinit_heads=True)
  assert variables['params']['stage4']['pos_embed'].shape == (1, 3, 3, 64)
  assert variables['params']['head']['kernel'].shape == (64, 5)
  with pytest.raises(CheckpointError, match='reinit_heads=True'):
    load_pretrained(directory, num_classes=5)
  with pytest.raises(CheckpointError, match='holds a vcmamba_nano model'):
    load_pretrained(directory, 'vcmamba_b')


def test_damaged_exported_directory_names_the_file_and_the_fix(nano_variables, tmp_path):
  import orbax.checkpoint as ocp

  directory = save_pretrained(
    tmp_path / 'export', nano_variables, 'vcmamba_nano', num_classes=10, img_size=64
  )
  weights = os.path.join(directory, 'model.safetensors')
  with open(weights, 'r+b') as f:
    f.truncate(100)
  with pytest.raises(CheckpointError) as info:
    load_pretrained(directory)
  message = str(info.value)
  assert weights in message and 'corrupt' in message
  assert 'export it again' in message and '--overwrite' in message
  # The earlier format (model.json + an orbax variables/ dir) with a file missing: the file is
  # named instead of a page of tensorstore JSON.
  legacy = tmp_path / 'legacy'
  legacy.mkdir()
  (legacy / 'model.json').write_text(
    '{"name": "vcmamba_nano", "model_kwargs": {"num_classes": 10, "img_size": 64}}'
  )
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(legacy / 'variables', nano_variables)
  checkpointer.wait_until_finished()
  assert load_pretrained(legacy)[0].num_classes == 10
  os.remove(legacy / 'variables' / 'manifest.ocdbt')
  with pytest.raises(CheckpointError) as info:
    load_pretrained(legacy)
  message = str(info.value)
  assert 'is damaged or incomplete: variables/manifest.ocdbt is missing; export it again' in message
  assert '{' not in message


def test_load_pretrained_detects_variant_of_pytorch_files(golden_state, tmp_path):
  path = tmp_path / 's.npz'
  np.savez(path, **golden_state)
  model, _ = load_pretrained(path)
  assert model.widths == (32, 64, 144, 288) and model.img_size == 224
