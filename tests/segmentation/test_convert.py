"""Strict mmseg checkpoint loading: clear errors for checkpoints that do not fit."""

from __future__ import annotations

import numpy as np
import pytest

import vcmamba_jax
from tests.segmentation import golden_seg as G
from vcmamba_jax import segmentation as seg
from vcmamba_jax.convert import CheckpointError


def zeros_state(variant: str, resolution: int) -> dict[str, np.ndarray]:
  shapes = G.seg_weights().state_dict_shapes(variant, resolution)
  return {k: np.zeros(s, np.float32) for k, s in shapes}


@pytest.fixture(scope='module', autouse=True)
def golden():
  G.require()


def test_checkpoint_of_another_variant_names_it(tmp_path):
  path = tmp_path / 'b.npz'
  np.savez(path, **zeros_state('b', 512))
  with pytest.raises(
    CheckpointError,
    match="looks like a sem_fpn_vcmamba_b checkpoint; pass name='sem_fpn_vcmamba_b'",
  ):
    vcmamba_jax.load_segmentation_weights(path, 'sem_fpn_vcmamba_s')


def test_geometry_comes_from_the_checkpoint(tmp_path):
  path = tmp_path / 's.npz'
  np.savez(path, **zeros_state('s', 128))
  model, variables = vcmamba_jax.load_segmentation_weights(path, 'sem_fpn_vcmamba_s')
  assert model.img_size == 128 and model.num_classes == 150
  with pytest.raises(CheckpointError, match='pass img_size=128'):
    vcmamba_jax.load_segmentation_weights(path, 'sem_fpn_vcmamba_s', img_size=512)


def test_missing_and_stray_keys_are_listed():
  state = zeros_state('s', 256)
  del state['neck.fpn_convs.2.conv.bias']
  state['decode_head.extra.weight'] = np.zeros(3, np.float32)
  model = seg.create_segmentation_model('sem_fpn_vcmamba_s', img_size=256)
  with pytest.raises(CheckpointError) as info:
    seg.state_dict_to_variables(state, model)
  message = str(info.value)
  assert 'missing keys (1): neck.fpn_convs.2.conv.bias (256,)' in message
  assert 'unexpected keys (1): decode_head.extra.weight (3,)' in message


def test_classification_checkpoint_is_refused_with_a_hint():
  model = seg.create_segmentation_model('sem_fpn_vcmamba_s', img_size=256)
  state = {
    k[len('backbone.') :]: v for k, v in zeros_state('s', 256).items() if k.startswith('backbone.')
  }
  with pytest.raises(CheckpointError, match='classification checkpoint.*init_from'):
    seg.state_dict_to_variables(state, model)


def test_unknown_model_name():
  with pytest.raises(ValueError, match='unknown segmentation model'):
    seg.create_segmentation_model('sem_fpn_vcmamba_xl')


def _random_variables(model, size):
  import jax
  import jax.numpy as jnp

  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


@pytest.mark.parametrize('resize', ['bicubic', 'upstream'])
def test_init_from_classification_weights_fills_the_backbone(tmp_path, resize):
  """init_from with ImageNet (classification) weights: the backbone is replaced strictly, the
  7x7-style pos_embed resized to the crop's grid, the neck and head keep their init."""
  from ml_collections import ConfigDict

  from vcmamba_jax import create_model
  from vcmamba_jax.convert import to_pytorch_state_dict
  from vcmamba_jax.segmentation import task

  classifier = create_model('vcmamba_nano', img_size=64)
  cls_vars = _random_variables(classifier, 64)
  path = tmp_path / 'nano_cls.npz'
  np.savez(path, **to_pytorch_state_dict(cls_vars))
  model = seg.create_segmentation_model('sem_fpn_vcmamba_nano', img_size=128)
  fresh = _random_variables(model, 128)
  config = ConfigDict(
    {'model': {'name': 'sem_fpn_vcmamba_nano', 'img_size': 128, 'pos_embed_resize': resize}}
  )
  weights, description = task.load_weights(str(path), model, config, fresh=fresh)
  out = weights['']
  assert 'backbone' in description.description
  np.testing.assert_array_equal(
    out['params']['backbone']['stage1']['block0']['mlp']['fc1']['kernel'],
    cls_vars['params']['stage1']['block0']['mlp']['fc1']['kernel'],
  )
  np.testing.assert_array_equal(
    out['batch_stats']['backbone']['stem']['bn1']['var'],
    cls_vars['batch_stats']['stem']['bn1']['var'],
  )
  np.testing.assert_array_equal(
    out['params']['neck']['fpn_convs_0']['kernel'], fresh['params']['neck']['fpn_convs_0']['kernel']
  )
  pos = np.asarray(out['params']['backbone']['stage4']['pos_embed'])
  assert pos.shape == (1, 4, 4, 64)
  src = np.asarray(cls_vars['params']['stage4']['pos_embed']).transpose(0, 3, 1, 2)
  if resize == 'upstream':
    want = seg.upstream_interpolate_pos_embed(src, 4)
  else:
    want = seg.backbone_state_from_classification({'pos_embed': src}, 128)['backbone.pos_embed']
  np.testing.assert_allclose(pos.transpose(0, 3, 1, 2), want, rtol=1e-6, atol=1e-6)
  # A checkpoint of another backbone is refused.
  other = seg.create_segmentation_model('sem_fpn_vcmamba_s', img_size=128)
  config.model.name = 'sem_fpn_vcmamba_s'
  with pytest.raises(CheckpointError, match='does not fit.*vcmamba_nano'):
    task.load_weights(str(path), other, config, fresh=_random_variables(other, 128))
