r"""Builds TFDS `imagenet2012` in ArrayRecord format for the grain input pipeline.

Download (free registration at https://image-net.org/download-images, "ILSVRC2012"), into one
directory, the MANUAL_DIR:

  MANUAL_DIR/
    ILSVRC2012_img_train.tar   147,897,477,120 bytes (138 GiB): 1,000 per-class tars
                               (n01440764.tar, ...) holding 1,281,167 JPEGs
    ILSVRC2012_img_val.tar       6,744,924,160 bytes (6.3 GiB): 50,000 JPEGs
                               (ILSVRC2012_val_00000001.JPEG, ...); TFDS ships their labels
    ILSVRC2012_img_test.tar    optional: adds the unlabelled 'test' split

The stock TFDS builder reads the tars directly (no extraction) and stores each JPEG's bytes
unchanged (only the 22 CMYK JPEGs and the one PNG are re-encoded), so:

- result: DATA_DIR/imagenet2012/5.1.0/, about 155 GB (train + validation);
- while the train split is written, TFDS also keeps temporary shuffle buckets of about the same
  size in DATA_DIR, so plan ~310 GB free in DATA_DIR, plus the ~155 GB of tars (delete them after);
- it runs in one process and is I/O bound (it reads and writes the whole dataset about twice):
  expect hours, not minutes; put DATA_DIR on a local SSD.

TensorFlow is not required (a small tf.io.gfile stand-in is used when it is missing).

Usage:
  python scripts/prepare_imagenet.py --manual_dir=/data/imagenet_tars --data_dir=/data/tfds
  # then train with --config.data.data_dir=/data/tfds (or set TFDS_DATA_DIR=/data/tfds)

  # Try the whole pipeline in seconds on a synthetic ImageNet (never mix it with real data):
  python scripts/prepare_imagenet.py --fake --data_dir=/tmp/fake_imagenet_tfds
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import app, flags, logging

from vcmamba_jax.data import datasets

_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir',
  None,
  'Directory with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar. With --fake: where '
  'to write the synthetic tars (default DATA_DIR/fake_manual).',
)
_DATA_DIR = flags.DEFINE_string(
  'data_dir',
  None,
  'TFDS data dir to write to (default: $TFDS_DATA_DIR or '
  '~/tensorflow_datasets). Required with --fake.',
)
_FAKE = flags.DEFINE_bool(
  'fake',
  False,
  'Write a synthetic manual_dir (random JPEGs, real tar layout) first and '
  'build that, to try the pipeline without ImageNet.',
)
_FAKE_NUM_CLASSES = flags.DEFINE_integer('fake_num_classes', 100, '--fake: number of classes.')
_FAKE_IMAGES_PER_CLASS = flags.DEFINE_integer(
  'fake_images_per_class', 20, '--fake: training images per class.'
)
_FAKE_NUM_VAL = flags.DEFINE_integer('fake_num_val', 500, '--fake: validation images.')
_FAKE_MIN_SIZE = flags.DEFINE_integer('fake_min_size', 300, '--fake: smallest image side.')
_FAKE_MAX_SIZE = flags.DEFINE_integer(
  'fake_max_size', 500, '--fake: largest image side (ImageNet averages about 400x350).'
)
_SEED = flags.DEFINE_integer('seed', 0, '--fake: random seed of the synthetic images.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  manual_dir = _MANUAL_DIR.value
  if _FAKE.value:
    if _DATA_DIR.value is None:
      raise app.UsageError(
        '--fake needs an explicit --data_dir, so that a synthetic imagenet2012 never lands in '
        'your default TFDS directory where it would later be mistaken for the real one'
      )
    default_location = manual_dir is None
    manual_dir = manual_dir or os.path.join(_DATA_DIR.value, 'fake_manual')
    existing = [
      name
      for name in (datasets.IMAGENET_TRAIN_TAR, datasets.IMAGENET_VAL_TAR)
      if (Path(manual_dir) / name).exists()
    ]
    if existing and not default_location:
      raise app.UsageError(
        f'{manual_dir} already holds {existing}; refusing to overwrite them with synthetic '
        'data. Pick another --manual_dir (or omit it).'
      )
    if existing:
      logging.info('Reusing the synthetic manual_dir in %s', manual_dir)
    else:
      fake = datasets.write_fake_imagenet_manual_dir(
        manual_dir,
        num_classes=_FAKE_NUM_CLASSES.value,
        images_per_class=_FAKE_IMAGES_PER_CLASS.value,
        num_val=_FAKE_NUM_VAL.value,
        seed=_SEED.value,
        image_size=(_FAKE_MIN_SIZE.value, _FAKE_MAX_SIZE.value),
      )
      logging.info(
        'Wrote a synthetic manual_dir: %d train / %d val images in %s',
        fake.num_train,
        fake.num_val,
        fake.manual_dir,
      )
  elif manual_dir is None:
    raise app.UsageError('pass --manual_dir=DIR (with the ILSVRC2012 tars) or --fake')
  path = datasets.prepare_imagenet2012(manual_dir, _DATA_DIR.value)
  print(f'imagenet2012 (array_record) is ready in {path}')


if __name__ == '__main__':
  app.run(main)
