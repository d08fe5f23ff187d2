"""scripts/predict_segmentation.py writes a colour-coded mask PNG beside each image; the
notebook's segmentation cell runs offline."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vcmamba_jax
from tests.scripts.conftest import load_script
from vcmamba_jax import segmentation as seg
from vcmamba_jax.data import normalize
from vcmamba_jax.segmentation import ade20k

predict = load_script('predict_segmentation')


@pytest.fixture(scope='module')
def nano_weights(tmp_path_factory):
  """A random sem_fpn_vcmamba_nano (64 px) as an mmseg-named .npz."""
  model = seg.create_segmentation_model('sem_fpn_vcmamba_nano', img_size=64)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  rng = np.random.default_rng(0)

  def fill(a):
    if len(a.shape) > 1:
      return (0.3 * rng.standard_normal(a.shape)).astype(np.float32)
    return np.ones(a.shape, np.float32)

  path = tmp_path_factory.mktemp('nano') / 'nano.npz'
  np.savez(path, **seg.to_mmseg_state_dict(jax.tree.map(fill, abstract)))
  return path


def test_writes_colour_mask_beside_the_image(nano_weights, tmp_path, capsys):
  image_path = tmp_path / 'photo.jpg'
  rng = np.random.default_rng(0)
  Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)).save(image_path)
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not an image')
  argv = ['--weights', str(nano_weights), '--model', 'sem_fpn_vcmamba_nano']
  argv += ['--image', str(image_path), str(broken), '--crop', '64', '--stride', '43']
  argv += ['--scale', '128', '64', '--labels']
  assert predict.main(argv) == 1
  out = capsys.readouterr()
  assert f'cannot read image {broken}' in out.err
  assert f'{image_path} -> {tmp_path / "photo_seg.png"}' in out.out
  mask = np.asarray(Image.open(tmp_path / 'photo_seg.png'))
  labels = np.asarray(Image.open(tmp_path / 'photo_labels.png'))
  assert mask.shape == (60, 80, 3) and labels.shape == (60, 80)
  np.testing.assert_array_equal(mask, ade20k.PALETTE[labels])
  assert len(np.unique(labels)) > 1  # random weights still give several classes


def test_notebook_segmentation_cell(nano_weights, monkeypatch, capsys):
  """The notebook's segmentation cell on the nano weights (small crop and scale)."""
  from tests.scripts.test_colab_notebook import as_python, code_cells

  (cell,) = [s for s in code_cells() if 'SEG_WEIGHTS' in s]
  monkeypatch.setenv('VCMAMBA_SEG_MODEL', 'sem_fpn_vcmamba_nano')
  monkeypatch.setenv('VCMAMBA_SEG_WEIGHTS', str(nano_weights))
  image = np.random.default_rng(0).integers(0, 256, size=(40, 52, 3), dtype=np.uint8)
  namespace = {'vcmamba_jax': vcmamba_jax, 'jax': jax, 'np': np, 'Image': Image}
  namespace.update(image=image, normalize=normalize)
  source = as_python(cell).replace(
    'SEG_CROP, SEG_STRIDE = 512, 341', 'SEG_CROP, SEG_STRIDE = 64, 43'
  )
  source = source.replace('(2048, 512)', '(96, 64)').replace(
    'transforms.eval_size(height, width)', 'transforms.eval_size(height, width, (96, 64))'
  )
  exec(compile(source, '<segment cell>', 'exec'), namespace)
  assert namespace['seg_mask'].shape == (40, 52, 3)
  assert namespace['seg_labels'].shape == (40, 52)
  assert capsys.readouterr().out.strip()
