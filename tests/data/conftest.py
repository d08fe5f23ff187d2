"""Shared fixtures: a small synthetic ImageNet built with the real TFDS builder, and digits."""

import dataclasses
import socket
from pathlib import Path

import pytest

from vcmamba_jax import data as vd


@dataclasses.dataclass(frozen=True)
class BuiltFakeImagenet:
  data_dir: Path
  fake: vd.FakeImagenet


@pytest.fixture(scope='session')
def fake_imagenet(tmp_path_factory: pytest.TempPathFactory) -> BuiltFakeImagenet:
  """8 classes (+ the CMYK/PNG special files' 2 synsets) x 8 train images, 2 of them corrupt,
  23 validation images; built into ArrayRecord by TFDS's own imagenet2012 builder."""
  root = tmp_path_factory.mktemp('fake_imagenet')
  fake = vd.write_fake_imagenet_manual_dir(
    root / 'manual',
    num_classes=8,
    images_per_class=8,
    num_val=23,
    seed=0,
    image_size=(40, 96),
    corrupt_train=2,
    special_images=True,
  )
  data_dir = root / 'tfds'
  vd.prepare_imagenet2012(fake.manual_dir, data_dir)
  return BuiltFakeImagenet(data_dir=data_dir, fake=fake)


def _no_network(*args, **kwargs):
  raise OSError('network access attempted while building an offline dataset')


@pytest.fixture(scope='session')
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
  """vcmamba_digits, built with socket connections disabled (it must be fully offline)."""
  data_dir = tmp_path_factory.mktemp('digits_tfds')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(socket.socket, 'connect', _no_network)
    vd.prepare_digits(data_dir)
  return data_dir
