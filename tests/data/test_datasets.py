"""TFDS sources: the offline digits builder, the imagenet2012 build from a fake manual dir."""

import collections
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from vcmamba_jax import data as vd
from vcmamba_jax.data import transforms


def test_digits_builds_offline_with_stated_split_sizes_and_stratified_labels(digits_dir):
  train = vd.get_source(vd.DIGITS, 'train', digits_dir)
  val = vd.get_source(vd.DIGITS, 'validation', digits_dir)
  assert (len(train), len(val)) == (1437, 360)

  targets = load_digits().target
  train_idx, val_idx = train_test_split(
    np.arange(len(targets)), test_size=360, stratify=targets, random_state=0
  )
  for source, idx in ((train, train_idx), (val, val_idx)):
    labels = collections.Counter(int(source[i]['label']) for i in range(len(source)))
    assert labels == collections.Counter(targets[idx].tolist())
  val_counts = collections.Counter(int(val[i]['label']) for i in range(len(val)))
  assert min(val_counts.values()) >= 34 and max(val_counts.values()) <= 38  # 360 / 10, stratified

  image = vd.decode_image(train[0]['image'])
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(
    image[..., 0], image[..., 2]
  )
  assert image.max() > 200 and image.min() < 30  # a real stroke on a dark background
  assert vd.get_num_classes(vd.DIGITS, digits_dir) == 10


def test_fake_imagenet_builds_with_real_tfds_builder(fake_imagenet):
  fake = fake_imagenet.fake
  train = vd.get_source(vd.IMAGENET, 'train', fake_imagenet.data_dir)
  val = vd.get_source(vd.IMAGENET, 'validation', fake_imagenet.data_dir)
  assert len(train) == fake.num_train == 80 and len(val) == 23

  synsets = vd.imagenet_synsets()
  undecodable = []
  for i in range(len(train)):
    record = train[i]
    file_name = record['file_name'].decode()
    synset = file_name.split('_')[0]
    assert synset in fake.synsets
    assert record['label'] == synsets.index(synset)  # label ids follow TFDS's labels.txt
    try:
      vd.decode_image(record['image'])
    except vd.ImageDecodeError:
      undecodable.append(file_name)
  # TFDS stores the corrupt bytes as they are; they only fail at decode time.
  assert sorted(undecodable) == sorted(fake.corrupt_files) and len(undecodable) == 2

  # The CMYK and PNG files were converted to RGB JPEG by the builder (TF-free stand-ins).
  special = {train[i]['file_name'].decode(): train[i]['image'] for i in range(len(train))}
  for name in ('n01739381_1309.JPEG', 'n02105855_2933.JPEG'):
    assert special[name][:2] == b'\xff\xd8'
    assert vd.decode_image(special[name]).shape[-1] == 3

  # Validation labels: the first 23 official labels, by sorted file name.
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  official = (
    Path(imagenet_common.tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt'))
    .read_text()
    .split()[:23]
  )
  got = {val[i]['file_name'].decode(): int(val[i]['label']) for i in range(len(val))}
  expected = {f'ILSVRC2012_val_{i + 1:08d}.JPEG': synsets.index(s) for i, s in enumerate(official)}
  assert got == expected


def test_imagenet_build_does_not_import_tensorflow(fake_imagenet):
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed here, so the TF-free build path is not used')
  # The session fixture built imagenet2012 with the stock builder; TF was never needed.
  assert 'tensorflow' not in sys.modules


def test_get_source_explains_how_to_prepare_imagenet(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'prepare_imagenet\.py'):
    vd.get_source(vd.IMAGENET, 'train', tmp_path)


def test_prepare_imagenet_names_missing_tars(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'ILSVRC2012_img_train\.tar.*image-net\.org'):
    vd.prepare_imagenet2012(tmp_path, tmp_path / 'tfds')


def test_fake_manual_dir_rejects_bad_sizes(tmp_path):
  with pytest.raises(ValueError, match='corrupt_train'):
    vd.write_fake_imagenet_manual_dir(tmp_path, num_classes=1, images_per_class=2, corrupt_train=3)


def test_class_names_follow_tfds_label_order():
  names = vd.imagenet_class_names()
  full = vd.imagenet_class_names(full=True)
  assert len(names) == len(full) == 1000
  assert names[:3] == ['tench', 'goldfish', 'great white shark']
  assert full[0] == 'tench, Tinca tinca'
  assert names[134] == names[517] == 'crane'
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  tfds_synsets = Path(imagenet_common.label_names_file()).read_text().split()
  assert transforms.imagenet_synsets() == tfds_synsets
