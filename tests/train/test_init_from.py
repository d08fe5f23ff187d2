"""init_from / eval_from sources: our checkpoints, exported model dirs and PyTorch-format files,
fitted to a model of another resolution and class count."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import traverse_util

from tests.train.smoke import smoke_config
from vcmamba_jax import checkpoint, convert
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.models import resize_pos_embed
from vcmamba_jax.train import builders, optim
from vcmamba_jax.train import state as state_lib


@pytest.fixture(scope='module')
def trained(reference_run):
  """The reference run's final weights as numpy."""
  return checkpoint.read_training_weights(reference_run)


@pytest.fixture(scope='module')
def finetune_config(imagenet_dir):
  # Another label set and resolution: 10 classes at 64 px (pos_embed grid 2x2 instead of 1x1).
  return smoke_config(imagenet_dir, **{'model.num_classes': 10, 'model.img_size': 64})


def _assert_fitted(weights, trained):
  loaded = traverse_util.flatten_dict(weights['params'])
  source = traverse_util.flatten_dict(trained['params'])
  assert loaded[('head', 'kernel')].shape == (64, 10)  # re-initialised for 10 classes
  assert loaded[('dist_head', 'bias')].shape == (10,)
  np.testing.assert_allclose(
    loaded[('stage4', 'pos_embed')],
    resize_pos_embed(source[('stage4', 'pos_embed')], (2, 2)),
    rtol=1e-6,
  )
  for path, value in source.items():
    if path[0] not in ('head', 'dist_head') and path[-1] != 'pos_embed':
      np.testing.assert_array_equal(loaded[path], value, err_msg='/'.join(path))
  for path, value in traverse_util.flatten_dict(trained['batch_stats']).items():
    np.testing.assert_array_equal(traverse_util.flatten_dict(weights['batch_stats'])[path], value)


def test_from_our_checkpoint_with_ema(reference_run, trained, finetune_config):
  model = builders.build_model(finetune_config)
  weights, source = builders.load_weights(
    reference_run, model, finetune_config, with_ema=True, reinit_heads=True
  )
  assert set(weights) == {'', 'ema'} and 'checkpoint' in source.description
  assert source.step == 8 and source.name == 'vcmamba_nano'
  _assert_fitted(weights[''], trained)
  _assert_fitted(weights['ema'], trained['ema'])


def test_from_an_exported_model_dir_and_a_pytorch_file(trained, finetune_config, tmp_path):
  variables = {'params': trained['params'], 'batch_stats': trained['batch_stats']}
  exported = convert.save_pretrained(
    tmp_path / 'exported', variables, 'vcmamba_nano', num_classes=1000, img_size=32
  )
  npz = tmp_path / 'weights.npz'
  np.savez(npz, **convert.to_pytorch_state_dict(variables, 'vcmamba_nano'))
  model = builders.build_model(finetune_config)
  for path in (exported, str(npz)):
    weights, source = builders.load_weights(path, model, finetune_config, reinit_heads=True)
    assert set(weights) == {''} and source.name == 'vcmamba_nano' and source.step is None
    _assert_fitted(weights[''], trained)


def test_pretrained_weights_replace_the_initial_state(reference_run, finetune_config):
  mesh = sharding_lib.create_mesh()
  model = builders.build_model(finetune_config)
  tx = optim.create_optimizer(finetune_config, optim.learning_rate_schedule(finetune_config, 3))
  state, shardings = state_lib.create_train_state(
    model, tx, jax.random.PRNGKey(0), mesh=mesh, image_size=64, use_ema=True
  )
  weights, _ = builders.load_weights(reference_run, model, finetune_config, reinit_heads=True)
  state = state_lib.with_pretrained(state, shardings, weights[''])
  for tree in (state.params, state.ema['params']):
    for new, expected in zip(jax.tree.leaves(tree), jax.tree.leaves(weights['']['params'])):
      np.testing.assert_array_equal(new, expected)
      assert new.sharding.mesh == mesh
  assert all(not np.any(np.asarray(mu)) for mu in jax.tree.leaves(state.opt_state[0].mu))


def test_evaluating_with_another_class_count_is_an_error(reference_run, finetune_config):
  model = builders.build_model(finetune_config)
  with pytest.raises(convert.CheckpointError, match='head'):
    builders.load_weights(reference_run, model, finetune_config)
