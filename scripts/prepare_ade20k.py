r"""Builds the ADE20K (SceneParsing, 150 classes) TFDS dataset `vcmamba_ade20k` in ArrayRecord
format for the segmentation pipeline.

Download ADEChallengeData2016.zip (923 MB) from
http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip into MANUAL_DIR (do not
unzip it). The builder reads the zip directly, stores every JPEG and annotation PNG unchanged
(20,210 train / 2,000 validation pairs, about 1 GB in DATA_DIR) and checks each pair (same size,
label values 0..150).

Usage:
  python scripts/prepare_ade20k.py --manual_dir=/data/ade_zip --data_dir=/data/tfds
  # then train with --config.data.data_dir=/data/tfds

  # A synthetic download (the real zip layout, a few random images) to try the pipeline:
  python scripts/prepare_ade20k.py --fake --data_dir=/tmp/fake_ade_tfds
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags, logging

from vcmamba_jax.segmentation import ade20k

_MANUAL_DIR = flags.DEFINE_string(
  'manual_dir', None, 'Directory holding ADEChallengeData2016.zip (--fake: where to write one).'
)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data dir (default: $TFDS_DATA_DIR).')
_FAKE = flags.DEFINE_bool('fake', False, 'Write and build a small synthetic download.')
_FAKE_TRAIN = flags.DEFINE_integer('fake_train', 64, '--fake: training images.')
_FAKE_VAL = flags.DEFINE_integer('fake_val', 16, '--fake: validation images.')


def main(argv: list[str]) -> None:
  del argv
  manual_dir = _MANUAL_DIR.value
  if _FAKE.value:
    if not _DATA_DIR.value:
      raise app.UsageError('--fake needs --data_dir (never mix a fake dataset with real data)')
    manual_dir = manual_dir or str(Path(_DATA_DIR.value) / 'fake_manual')
    ade20k.write_fake_ade20k_manual_dir(
      manual_dir, num_train=_FAKE_TRAIN.value, num_val=_FAKE_VAL.value, image_size=(128, 320)
    )
  if not manual_dir:
    raise app.UsageError(
      '--manual_dir is required (the directory holding ADEChallengeData2016.zip)'
    )
  path = ade20k.prepare_ade20k(manual_dir, _DATA_DIR.value)
  logging.info('ADE20K ready in %s', path)
  print(path)


if __name__ == '__main__':
  app.run(main)
