"""scripts/predict_segmentation.py writes a colour-coded mask PNG beside each image."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tests.scripts.conftest import load_script
from vcmamba_jax import segmentation as seg
from vcmamba_jax.segmentation import ade20k

predict = load_script('predict_segmentation')


def test_writes_colour_mask_beside_the_image(tmp_path, capsys):
  model = seg.create_segmentation_model('sem_fpn_vcmamba_nano', img_size=64)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(
    lambda a: (
      (0.3 * rng.standard_normal(a.shape)).astype(np.float32)
      if len(a.shape) > 1
      else np.ones(a.shape, np.float32)
    ),
    abstract,
  )
  weights = tmp_path / 'nano.npz'
  np.savez(weights, **seg.to_mmseg_state_dict(variables))
  image_path = tmp_path / 'photo.jpg'
  Image.fromarray(rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)).save(image_path)
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'not an image')
  argv = ['--weights', str(weights), '--model', 'sem_fpn_vcmamba_nano', '--image', str(image_path)]
  argv += [str(broken), '--crop', '64', '--stride', '43', '--scale', '128', '64', '--labels']
  assert predict.main(argv) == 1
  out = capsys.readouterr()
  assert f'cannot read image {broken}' in out.err
  mask = np.asarray(Image.open(tmp_path / 'photo_seg.png'))
  labels = np.asarray(Image.open(tmp_path / 'photo_labels.png'))
  assert mask.shape == (60, 80, 3) and labels.shape == (60, 80)
  np.testing.assert_array_equal(mask, ade20k.PALETTE[labels])
  assert len(np.unique(labels)) > 1  # random weights still give several classes
