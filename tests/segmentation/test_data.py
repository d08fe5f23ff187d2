"""ADE20K data: the TFDS builder on a generated fake download, its errors, mmseg's transforms
(image and label stay aligned) and the grain pipelines."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from vcmamba_jax.segmentation import ade20k, pipeline, transforms


@pytest.fixture(scope='module')
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp('ade')
  fake = ade20k.write_fake_ade20k_manual_dir(root / 'manual', num_train=6, num_val=3)
  data_dir = root / 'tfds'
  ade20k.prepare_ade20k(fake.manual_dir, data_dir)
  return fake, data_dir


def test_builder_on_a_fake_download(prepared):
  fake, data_dir = prepared
  train = ade20k.get_ade20k_source('train', data_dir)
  val = ade20k.get_ade20k_source('validation', data_dir)
  assert (len(train), len(val)) == (6, 3)
  record = val[0]
  image, label = transforms.decode_pair(record['image'], record['label'])
  assert image.dtype == np.uint8 and image.shape[2] == 3 and label.shape == image.shape[:2]
  assert set(np.unique(label)) <= set(fake.classes)
  # The label bytes are the annotation PNG as shipped.
  with zipfile.ZipFile(fake.manual_dir / ade20k.ZIP_NAME) as z:
    stem = record['file_name'].decode()
    assert record['label'] == z.read(f'{ade20k.ROOT}/annotations/validation/{stem}.png')


def test_missing_manual_download_says_what_and_where(tmp_path):
  with pytest.raises(ade20k.MissingManualDownloadError) as info:
    ade20k.prepare_ade20k(tmp_path / 'empty', tmp_path / 'tfds')
  message = str(info.value)
  assert 'ADEChallengeData2016.zip' in message and ade20k.ZIP_URL in message
  assert str(tmp_path / 'empty') in message
  with pytest.raises(FileNotFoundError, match='prepare_ade20k.py'):
    ade20k.get_ade20k_source('train', tmp_path / 'tfds')


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _zip_with_one_pair(path, image: np.ndarray, label: np.ndarray) -> None:
  path.mkdir(parents=True)
  with zipfile.ZipFile(path / ade20k.ZIP_NAME, 'w') as z:
    for folder in ('training', 'validation'):
      z.writestr(f'{ade20k.ROOT}/images/{folder}/ADE_x_00000001.jpg', _jpeg(image))
      z.writestr(f'{ade20k.ROOT}/annotations/{folder}/ADE_x_00000001.png', _png(label))


def _jpeg(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='JPEG')
  return buffer.getvalue()


@pytest.mark.parametrize(
  'label, match',
  [
    (np.zeros((40, 30), np.uint8), 'image is 40x32 but its label is 40x30'),
    (np.full((40, 32), 151, np.uint8), r'label values \[151\] are outside 0..150'),
  ],
)
def test_builder_rejects_bad_annotations(tmp_path, label, match):
  _zip_with_one_pair(tmp_path / 'manual', np.zeros((40, 32, 3), np.uint8), label)
  with pytest.raises(ade20k.InvalidAnnotationError, match=match):
    ade20k.prepare_ade20k(tmp_path / 'manual', tmp_path / 'tfds')


def test_pipeline_rejects_bad_pairs():
  image = _jpeg(np.zeros((20, 24, 3), np.uint8))
  with pytest.raises(ade20k.InvalidAnnotationError, match='image is 20x24 but its label is 24x20'):
    transforms.decode_pair(image, _png(np.zeros((24, 20), np.uint8)), 'record 3')
  with pytest.raises(ade20k.InvalidAnnotationError, match='outside 0..150'):
    transforms.decode_pair(image, _png(np.full((20, 24), 200, np.uint8)), 'record 3')


# ------------------------------------------------------------------------------------------------
# Transforms.
# ------------------------------------------------------------------------------------------------
def _coloured_pair(rng, height, width):
  """Blocks of classes 1..150 with a colour per class, and the lookup back."""
  label = np.zeros((height, width), np.uint8)
  for _ in range(6):
    h, w = rng.integers(10, height // 2), rng.integers(10, width // 2)
    y, x = rng.integers(0, height - h), rng.integers(0, width - w)
    label[y : y + h, x : x + w] = rng.integers(1, 151)
  colours = np.random.default_rng(1).integers(0, 256, size=(151, 3)).astype(np.uint8)
  return colours[label], label, colours


def _interior(label, k=7):
  """Pixels whose (2k+1)^2 neighbourhood has one label (bilinear image vs nearest label differ
  by up to the resize factor at class boundaries, as in mmseg)."""
  padded = np.pad(label, k, mode='edge')
  same = np.ones(label.shape, bool)
  for dy in range(2 * k + 1):
    for dx in range(2 * k + 1):
      same &= padded[dy : dy + label.shape[0], dx : dx + label.shape[1]] == label
  return same


def _agreement(image, label, colours, valid):
  distances = ((image[..., None, :].astype(np.int32) - colours[1:].astype(np.int32)) ** 2).sum(-1)
  decoded = distances.argmin(-1)  # class index 0..149 after reduce_zero_label
  keep = valid & (label != 255)
  return float((decoded[keep] == label[keep]).mean()) if keep.any() else 0.0


@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_train_transform_keeps_image_and_label_aligned(flip_prob):
  rng = np.random.default_rng(0)
  t = transforms.SegTrainTransform(
    crop_size=64, scale=(256, 64), flip_prob=flip_prob, photometric=False
  )
  hits = total = 0
  for seed in range(6):
    image, label, colours = _coloured_pair(
      rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))
    )
    out_image, out_label, size = t(image, label, np.random.default_rng(seed))
    assert out_image.shape == (64, 64, 3) and out_label.shape == (64, 64)
    h, w = size
    valid = np.zeros((64, 64), bool)
    valid[:h, :w] = True
    assert (out_label[~valid] == 255).all() and (out_image[~valid] == 0).all()
    assert set(np.unique(out_label[valid])) <= set(range(150)) | {255}
    interior = valid & _interior(out_label)
    hits += _agreement(out_image, out_label, colours, interior) * interior.sum()
    total += interior.sum()
    # The same labels against a mirrored image disagree: alignment is what the check measures.
    assert _agreement(out_image[:, ::-1], out_label, colours, valid & valid[:, ::-1]) < 0.9
  assert total > 1000 and hits / total > 0.99


def test_train_transform_geometry_and_reduce_zero_label():
  t = transforms.SegTrainTransform(crop_size=64, scale=(256, 64), photometric=False)
  label = np.zeros((40, 80), np.uint8)
  label[:, 40:] = 7
  image = np.zeros((40, 80, 3), np.uint8)
  _, out_label, size = t(image, label, np.random.default_rng(3))
  assert set(np.unique(out_label)) <= {255, 6}  # 0 (other) -> ignored, 7 -> 6
  assert 6 in out_label


def test_photometric_distortion_changes_colours_only():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
  back = transforms.hsv_to_rgb(transforms.rgb_to_hsv(image))
  assert np.abs(back.astype(int) - image).max() <= 4
  out = transforms.PhotoMetricDistortion()(image, np.random.default_rng(5))
  assert out.shape == image.shape and out.dtype == np.uint8 and not np.array_equal(out, image)


def test_eval_transform_align_resize():
  assert transforms.eval_size(512, 683) == (512, 704)  # 683 -> 683, aligned to 704
  assert transforms.eval_size(1024, 768) == (704, 512)  # short side 512: 683 x 512 -> 704 x 512
  assert transforms.eval_size(300, 2400) == (256, 2048)  # long side capped at 2048
  t = transforms.SegEvalTransform(image_canvas=(128, 192), label_canvas=(96, 160))
  image = np.full((60, 90, 3), 200, np.uint8)
  label = np.random.default_rng(0).integers(0, 151, size=(60, 90)).astype(np.uint8)
  t = transforms.SegEvalTransform(image_canvas=(128, 192), label_canvas=(96, 160), scale=(192, 64))
  out_image, out_label, size, orig = t(image, label)
  assert tuple(size) == (64, 96) and tuple(orig) == (60, 90)
  assert (out_image[:64, :96] == 200).all() and (out_image[64:] == 0).all()
  np.testing.assert_array_equal(out_label[:60, :90], label)
  assert (out_label[60:] == 255).all() and (out_label[:, 90:] == 255).all()


# ------------------------------------------------------------------------------------------------
# grain pipelines.
# ------------------------------------------------------------------------------------------------
def test_train_pipeline_batches_are_deterministic(prepared):
  _, data_dir = prepared
  source = ade20k.get_ade20k_source('train', data_dir)
  t = transforms.SegTrainTransform(crop_size=48, scale=(192, 48))

  def first_two(seed):
    it = iter(
      pipeline.create_seg_train_dataset(
        source=source, global_batch_size=4, transform=t, seed=seed, process_index=0, process_count=1
      )
    )
    return [next(it) for _ in range(2)]

  a, b, c = first_two(0), first_two(0), first_two(1)
  assert a[0]['image'].shape == (4, 48, 48, 3) and a[0]['label'].shape == (4, 48, 48)
  assert a[0]['label'].dtype == np.uint8 and a[0]['size'].shape == (4, 2)
  for x, y in zip(a, b):
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])
  assert not np.array_equal(a[0]['image'], c[0]['image'])


def test_eval_pipeline_covers_the_split_once_across_processes(prepared):
  _, data_dir = prepared
  source = ade20k.get_ade20k_source('validation', data_dir)
  t = transforms.SegEvalTransform(image_canvas=(128, 128), label_canvas=(96, 96), scale=(128, 64))
  seen = []
  for p in range(2):
    ds = pipeline.create_seg_eval_dataset(
      source=source, global_batch_size=4, transform=t, process_index=p, process_count=2
    )
    for batch in ds:
      assert batch['image'].shape == (2, 128, 128, 3) and batch['label'].shape == (2, 96, 96)
      seen += batch['index'][batch['mask']].tolist()
      for row in np.nonzero(batch['mask'])[0]:
        raw = transforms.decode_pair(
          source[int(batch['index'][row])]['image'], source[int(batch['index'][row])]['label']
        )[1]
        h, w = batch['orig_size'][row]
        np.testing.assert_array_equal(batch['label'][row, :h, :w], raw)
  assert sorted(seen) == [0, 1, 2]
