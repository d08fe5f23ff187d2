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
