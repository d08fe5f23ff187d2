"""TFDS data sources (ArrayRecord, random access) for the grain pipeline.

- `get_source(name, split, data_dir)`: a `tfds.data_source` whose records are
  `{'image': encoded bytes, 'label': int, ...}` (images are NOT decoded here: the pipeline decodes
  only the crop it needs).
- `vcmamba_digits`: a tiny offline dataset (scikit-learn's 1,797 real 8x8 handwritten digits,
  upscaled to 32x32 RGB PNGs; 1,437 train / 360 validation, stratified) for demos and smoke runs.
  It is registered with TFDS on import of `vcmamba_jax.data` and prepared automatically.
- `prepare_imagenet2012(manual_dir, data_dir)`: builds TFDS `imagenet2012` in ArrayRecord format
  from the official tars with the stock TFDS builder. TensorFlow is not needed: a small
  `tf.io.gfile` stand-in (plus PIL for the 23 CMYK/PNG files) is patched in while it runs.
- `write_fake_imagenet_manual_dir(...)`: a small synthetic manual_dir with the real tar layout, for
  tests and for trying the whole pipeline without ImageNet.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import importlib.util
import io
import os
import tarfile
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

DIGITS = 'vcmamba_digits'
IMAGENET = 'imagenet2012'
IMAGENET_TRAIN_TAR = 'ILSVRC2012_img_train.tar'
IMAGENET_VAL_TAR = 'ILSVRC2012_img_val.tar'
_ARRAY_RECORD = 'array_record'
_PREPARE_IMAGENET_HINT = (
  'python scripts/prepare_imagenet.py --manual_dir=DIR_WITH_ILSVRC2012_TARS --data_dir={data_dir}'
  '  (or `--fake` to try the pipeline on a small synthetic ImageNet)'
)


# ------------------------------------------------------------------------------------------------
# vcmamba_digits: offline demo dataset.
# ------------------------------------------------------------------------------------------------


class VcmambaDigits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn `load_digits` (UCI optical digits) as 32x32 RGB PNGs, 10 classes.

  Splits: 'train' 1,437 and 'validation' 360 images, stratified by class with a fixed seed
  (`sklearn.model_selection.train_test_split(test_size=360, stratify=y, random_state=0)`).
  Pixels: the 0..16 grey levels scaled to 0..255, upscaled 8 -> 32 bicubic, replicated to RGB.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}
  IMAGE_SIZE = 32
  NUM_VALIDATION = 360
  SPLIT_SEED = 0

  def _info(self) -> tfds.core.DatasetInfo:
    # `DatasetInfo(builder=self)` rather than `dataset_info_from_configs`, which looks for
    # metadata files next to the module.
    return tfds.core.DatasetInfo(
      builder=self,
      description='Real 8x8 handwritten digits (scikit-learn load_digits) as 32x32 RGB PNGs.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(
            shape=(self.IMAGE_SIZE, self.IMAGE_SIZE, 3), encoding_format='png'
          ),
          'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
        }
      ),
      supervised_keys=('image', 'label'),
      homepage='https://scikit-learn.org/stable/modules/generated/'
      'sklearn.datasets.load_digits.html',
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager  # offline: the data ships with scikit-learn
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(
      indices, test_size=self.NUM_VALIDATION, stratify=digits.target, random_state=self.SPLIT_SEED
    )
    return {
      'train': self._generate_examples(digits.images, digits.target, np.sort(train_idx)),
      'validation': self._generate_examples(digits.images, digits.target, np.sort(val_idx)),
    }

  def _generate_examples(
    self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray
  ) -> Iterator[tuple[int, dict[str, Any]]]:
    for index in indices:
      grey = np.rint(images[index] * (255.0 / 16.0)).astype(np.uint8)
      img = (
        Image.fromarray(grey, mode='L')
        .resize((self.IMAGE_SIZE, self.IMAGE_SIZE), Image.Resampling.BICUBIC)
        .convert('RGB')
      )
      buffer = io.BytesIO()
      img.save(buffer, format='PNG')
      # Encoded bytes: encoding a numpy array would need TensorFlow.
      yield int(index), {'image': buffer.getvalue(), 'label': int(labels[index])}


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
  """Inter-process lock so that concurrent processes prepare a dataset only once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, 'w') as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def _builder(name: str, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
  return tfds.builder(
    name, data_dir=None if data_dir is None else os.fspath(data_dir), file_format=_ARRAY_RECORD
  )


def prepare_digits(data_dir: str | os.PathLike | None = None) -> Path:
  """Builds `vcmamba_digits` (offline, ~1 s) into data_dir if missing; returns its directory."""
  builder = _builder(DIGITS, data_dir)
  if not builder.is_prepared():
    with _file_lock(Path(builder.data_dir).parent / '.prepare.lock'):
      builder = _builder(DIGITS, data_dir)  # another process may have finished meanwhile
      if not builder.is_prepared():
        logging.info('Preparing %s in %s', DIGITS, builder.data_dir)
        builder.download_and_prepare()
  return Path(builder.data_dir)


# ------------------------------------------------------------------------------------------------
# Sources.
# ------------------------------------------------------------------------------------------------


def get_source(
  name: str,
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  decode_images: bool = False,
) -> Sequence[dict[str, Any]]:
  """Random-access ArrayRecord source of a prepared TFDS dataset.

  Args:
    name: TFDS name, e.g. 'imagenet2012' or 'vcmamba_digits' (prepared on first use).
    split: TFDS split, e.g. 'train', 'validation', 'train[:10000]'.
    data_dir: TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    decode_images: False (default) returns the image as encoded bytes, which the pipeline decodes
      itself (crop-aware); True returns uint8 [H, W, 3] arrays.

  Returns:
    A sequence: `len(source)` records, `source[i]` -> `{'image', 'label', ...}`.
  """
  if name == DIGITS:
    prepare_digits(data_dir)
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    where = data_dir if data_dir is not None else builder.data_dir
    if name == IMAGENET:
      raise FileNotFoundError(
        f'TFDS dataset {name!r} is not prepared in data_dir={where}. Build it from the official '
        f'tars with:\n  {_PREPARE_IMAGENET_HINT.format(data_dir=data_dir or "DATA_DIR")}'
      )
    raise FileNotFoundError(
      f'TFDS dataset {name!r} is not prepared in data_dir={where}. Prepare it in ArrayRecord '
      f'format first, e.g. `tfds build {name} --data_dir=... --file_format=array_record`.'
    )
  formats = {str(getattr(f, 'value', f)) for f in builder.info.available_file_formats()}
  if _ARRAY_RECORD not in formats:
    raise ValueError(
      f'TFDS dataset {name!r} in {builder.data_dir} is stored as {sorted(formats)}, but grain '
      'needs random access (array_record). Convert it with `tfds convert_format '
      f'--dataset_version_dir={builder.data_dir} --out_file_format=array_record` or re-prepare '
      'it with file_format=array_record.'
    )
  decoders = None if decode_images else {'image': tfds.decode.SkipDecoding()}
  return tfds.data_source(
    name,
    split=split,
    data_dir=None if data_dir is None else os.fspath(data_dir),
    download=False,
    decoders=decoders,
    builder_kwargs={'file_format': _ARRAY_RECORD},
  )


def get_num_classes(name: str, data_dir: str | os.PathLike | None = None) -> int:
  """Number of classes of the 'label' feature of a prepared (or registered) TFDS dataset."""
  return _builder(name, data_dir).info.features['label'].num_classes


# ------------------------------------------------------------------------------------------------
# ImageNet: build with the stock TFDS builder, TensorFlow optional.
# ------------------------------------------------------------------------------------------------


def _pil_jpeg_cmyk_to_rgb(image_bytes: bytes, quality: int = 100) -> bytes:
  """TF-free replacement of `tfds.core.utils.jpeg_cmyk_to_rgb` (22 ImageNet train files)."""
  buffer = io.BytesIO()
  Image.open(io.BytesIO(image_bytes)).convert('RGB').save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


def _pil_png_to_jpeg(image_bytes: bytes, quality: int = 100) -> bytes:
  """TF-free replacement of `tfds.core.utils.png_to_jpeg` (1 ImageNet train file)."""
  return _pil_jpeg_cmyk_to_rgb(image_bytes, quality)


def _gfile_open(path: str | os.PathLike, mode: str = 'r') -> Any:
  # Like tf.io.gfile.GFile, returns an open file; the callers use it as a context manager.
  return open(os.fspath(path), mode)


def _gfile_stand_in() -> types.SimpleNamespace:
  """The few `tf.*` calls the imagenet2012 builder and the TFDS tar extractor make."""
  gfile = types.SimpleNamespace(
    exists=lambda path: os.path.exists(os.fspath(path)), GFile=_gfile_open
  )

  def as_text(value: str | bytes) -> str:
    return value.decode('utf-8') if isinstance(value, bytes) else value

  return types.SimpleNamespace(
    io=types.SimpleNamespace(gfile=gfile), compat=types.SimpleNamespace(as_text=as_text)
  )


@contextlib.contextmanager
def tfds_imagenet_without_tensorflow() -> Iterator[None]:
  """Lets the stock TFDS imagenet2012 builder run without TensorFlow installed.

  If TensorFlow is importable nothing is patched. Otherwise the builder modules' lazy `tf` is
  replaced by a local-filesystem `tf.io.gfile` stand-in and the two TF image conversions by PIL,
  for the duration of the block (process-global: don't build other TFDS datasets concurrently).
  """
  if importlib.util.find_spec('tensorflow') is not None:
    yield
    return
  from tensorflow_datasets.core import utils as tfds_utils
  from tensorflow_datasets.core.download import extractor
  from tensorflow_datasets.datasets.imagenet2012 import (
    imagenet2012_dataset_builder,
    imagenet_common,
  )

  stand_in = _gfile_stand_in()
  patches = [
    (module, 'tf', stand_in)
    for module in (imagenet2012_dataset_builder, imagenet_common, extractor)
  ]
  patches += [
    (tfds_utils, 'jpeg_cmyk_to_rgb', _pil_jpeg_cmyk_to_rgb),
    (tfds_utils, 'png_to_jpeg', _pil_png_to_jpeg),
  ]
  saved = [(module, attr, getattr(module, attr)) for module, attr, _ in patches]
  try:
    for module, attr, value in patches:
      setattr(module, attr, value)
    yield
  finally:
    for module, attr, value in saved:
      setattr(module, attr, value)


def prepare_imagenet2012(
  manual_dir: str | os.PathLike,
  data_dir: str | os.PathLike | None = None,
) -> Path:
  """Builds TFDS `imagenet2012` (ArrayRecord) from the official ILSVRC2012 tars.

  Args:
    manual_dir: directory holding ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (and
      optionally ILSVRC2012_img_test.tar), as downloaded from https://image-net.org.
    data_dir: TFDS data dir to write to (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).

  Returns:
    The prepared dataset directory (`<data_dir>/imagenet2012/5.1.0`). A no-op if it exists.
  """
  manual_dir = Path(manual_dir).expanduser()
  missing = [f for f in (IMAGENET_TRAIN_TAR, IMAGENET_VAL_TAR) if not (manual_dir / f).is_file()]
  if missing:
    raise FileNotFoundError(
      f'{manual_dir} lacks {missing}. Download the ILSVRC2012 training and validation tars from '
      'https://image-net.org/download-images (free registration) into that directory, or '
      'write a synthetic one with `python scripts/prepare_imagenet.py --fake`.'
    )
  with tfds_imagenet_without_tensorflow():
    builder = _builder(IMAGENET, data_dir)
    if builder.is_prepared():
      logging.info('%s is already prepared in %s', IMAGENET, builder.data_dir)
    else:
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
      )
  return Path(builder.data_dir)


# ------------------------------------------------------------------------------------------------
# Synthetic ImageNet manual_dir (tests, demos).
# ------------------------------------------------------------------------------------------------

# Files the TFDS builder converts (CMYK JPEG -> RGB JPEG, PNG -> JPEG) before storing.
_SPECIAL_FILES = {'n01739381': 'n01739381_1309.JPEG', 'n02105855': 'n02105855_2933.JPEG'}


@dataclasses.dataclass(frozen=True)
class FakeImagenet:
  """What `write_fake_imagenet_manual_dir` wrote."""

  manual_dir: Path
  synsets: tuple[str, ...]  # train classes (synset ids)
  num_train: int
  num_val: int
  corrupt_files: tuple[str, ...]  # train file names whose bytes do not decode


def _random_photo(rng: np.random.Generator, width: int, height: int, grey: bool) -> Image.Image:
  """Smooth random colour field plus grain: compresses like a photo (not like pure noise)."""
  coarse = rng.integers(0, 256, size=(max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
  img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
  pixels = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, size=(height, width, 3))
  img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  return img.convert('L') if grey else img


def _encode(img: Image.Image, fmt: str = 'JPEG') -> bytes:
  buffer = io.BytesIO()
  img.save(buffer, format=fmt, quality=90) if fmt == 'JPEG' else img.save(buffer, format=fmt)
  return buffer.getvalue()


def _corrupt(data: bytes, kind: int, rng: np.random.Generator) -> bytes:
  # Kind 0: a truncated JPEG (header parses, decoding fails); kind 1: JPEG magic + garbage.
  if kind == 0:
    return data[: max(64, len(data) // 3)]
  return b'\xff\xd8\xff\xe0' + rng.integers(0, 256, size=512, dtype=np.uint8).tobytes()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet_manual_dir(
  path: str | os.PathLike,
  *,
  num_classes: int = 10,
  images_per_class: int = 10,
  num_val: int = 20,
  seed: int = 0,
  image_size: tuple[int, int] = (48, 128),
  corrupt_train: int = 0,
  grey_fraction: float = 0.1,
  special_images: bool = False,
) -> FakeImagenet:
  """Writes a synthetic ImageNet manual_dir with the official tar layout.

  ILSVRC2012_img_train.tar holds one `<synset>.tar` per class (synsets = the first `num_classes`
  ids of TFDS's labels.txt), each with `<synset>_<i>.JPEG` files; ILSVRC2012_img_val.tar holds
  ILSVRC2012_val_%08d.JPEG (TFDS labels them with the first `num_val` official labels).

  Args:
    path: directory to create/fill.
    num_classes, images_per_class, num_val: sizes.
    seed: makes the content reproducible.
    image_size: (min, max) side in pixels; width and height are drawn independently.
    corrupt_train: number of train files replaced by bytes that TFDS stores as they are but that
      fail to decode (truncated JPEGs and garbage with a JPEG signature).
    grey_fraction: fraction of single-channel (grayscale) JPEGs, as in real ImageNet.
    special_images: also add the CMYK JPEG and the PNG-in-disguise file names that the TFDS
      builder converts (adds their 2 synsets to the classes).

  Returns:
    A `FakeImagenet` describing the files.
  """
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  manual_dir = Path(path)
  manual_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  all_synsets = Path(imagenet_common.label_names_file()).read_text().split()
  if not 1 <= num_classes <= len(all_synsets):
    raise ValueError(f'num_classes must be in [1, {len(all_synsets)}], got {num_classes}')
  synsets = list(all_synsets[:num_classes])
  if special_images:
    synsets += [s for s in _SPECIAL_FILES if s not in synsets]
  num_train = len(synsets) * images_per_class
  if not 0 <= corrupt_train <= num_train:
    raise ValueError(f'corrupt_train must be in [0, {num_train}], got {corrupt_train}')
  corrupt = set(rng.choice(num_train, size=corrupt_train, replace=False).tolist())

  def sample_size() -> tuple[int, int]:
    low, high = image_size
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))

  corrupt_files = []
  with tarfile.open(manual_dir / IMAGENET_TRAIN_TAR, 'w') as train_tar:
    position = 0
    for synset in synsets:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(images_per_class):
          name = f'{synset}_{i}.JPEG'
          width, height = sample_size()
          img = _random_photo(rng, width, height, grey=rng.random() < grey_fraction)
          if special_images and i == 0 and synset in _SPECIAL_FILES:
            name = _SPECIAL_FILES[synset]
            data = _encode(img.convert('CMYK')) if synset == 'n01739381' else _encode(img, 'PNG')
          else:
            data = _encode(img)
          if position in corrupt:
            data = _corrupt(data, len(corrupt_files) % 2, rng)
            corrupt_files.append(name)
          _add_bytes(class_tar, name, data)
          position += 1
      _add_bytes(train_tar, f'{synset}.tar', inner.getvalue())

  with tarfile.open(manual_dir / IMAGENET_VAL_TAR, 'w') as val_tar:
    for i in range(1, num_val + 1):
      width, height = sample_size()
      img = _random_photo(rng, width, height, grey=rng.random() < grey_fraction)
      _add_bytes(val_tar, f'ILSVRC2012_val_{i:08d}.JPEG', _encode(img))
  return FakeImagenet(
    manual_dir=manual_dir,
    synsets=tuple(synsets),
    num_train=num_train,
    num_val=num_val,
    corrupt_files=tuple(corrupt_files),
  )
