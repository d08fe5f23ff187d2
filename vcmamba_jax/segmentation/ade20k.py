"""ADE20K (SceneParsing, 150 classes) as a TFDS ArrayRecord dataset built from the official
``ADEChallengeData2016.zip`` (manual download), and a synthetic download for tests.

TFDS's own ``scene_parse150`` holds instance masks rather than the 150-class labels mmseg trains
on, hence this builder. Records: ``image`` (the JPEG bytes as shipped), ``label`` (the annotation
PNG bytes as shipped: uint8, 0 = "other", 1..150 = classes), ``file_name``. Splits 'train'
(20,210) and 'validation' (2,000). The builder checks every pair: same size, label values in
0..150 (a clear error names the file otherwise).

    python scripts/prepare_ade20k.py --manual_dir=DIR_WITH_THE_ZIP --data_dir=$TFDS_DATA_DIR
"""

from __future__ import annotations

import dataclasses
import io
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

ADE20K = 'vcmamba_ade20k'
ZIP_NAME = 'ADEChallengeData2016.zip'
ZIP_URL = 'http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip'
ROOT = 'ADEChallengeData2016'
NUM_CLASSES = 150
NUM_TRAIN, NUM_VAL = 20_210, 2_000
_SPLIT_DIRS = {'train': 'training', 'validation': 'validation'}

# mmseg ADE20KDataset.CLASSES (objectInfo150 names, first synonym), in label order 1..150.
CLASS_NAMES = [
  'wall',
  'building',
  'sky',
  'floor',
  'tree',
  'ceiling',
  'road',
  'bed',
  'windowpane',
  'grass',
  'cabinet',
  'sidewalk',
  'person',
  'earth',
  'door',
  'table',
  'mountain',
  'plant',
  'curtain',
  'chair',
  'car',
  'water',
  'painting',
  'sofa',
  'shelf',
  'house',
  'sea',
  'mirror',
  'rug',
  'field',
  'armchair',
  'seat',
  'fence',
  'desk',
  'rock',
  'wardrobe',
  'lamp',
  'bathtub',
  'railing',
  'cushion',
  'base',
  'box',
  'column',
  'signboard',
  'chest_of_drawers',
  'counter',
  'sand',
  'sink',
  'skyscraper',
  'fireplace',
  'refrigerator',
  'grandstand',
  'path',
  'stairs',
  'runway',
  'case',
  'pool_table',
  'pillow',
  'screen_door',
  'stairway',
  'river',
  'bridge',
  'bookcase',
  'blind',
  'coffee_table',
  'toilet',
  'flower',
  'book',
  'hill',
  'bench',
  'countertop',
  'stove',
  'palm',
  'kitchen_island',
  'computer',
  'swivel_chair',
  'boat',
  'bar',
  'arcade_machine',
  'hovel',
  'bus',
  'towel',
  'light',
  'truck',
  'tower',
  'chandelier',
  'awning',
  'streetlight',
  'booth',
  'television_receiver',
  'airplane',
  'dirt_track',
  'apparel',
  'pole',
  'land',
  'bannister',
  'escalator',
  'ottoman',
  'bottle',
  'buffet',
  'poster',
  'stage',
  'van',
  'ship',
  'fountain',
  'conveyer_belt',
  'canopy',
  'washer',
  'plaything',
  'swimming_pool',
  'stool',
  'barrel',
  'basket',
  'waterfall',
  'tent',
  'bag',
  'minibike',
  'cradle',
  'oven',
  'ball',
  'food',
  'step',
  'tank',
  'trade_name',
  'microwave',
  'pot',
  'animal',
  'bicycle',
  'lake',
  'dishwasher',
  'screen',
  'blanket',
  'sculpture',
  'hood',
  'sconce',
  'vase',
  'traffic_light',
  'tray',
  'ashcan',
  'fan',
  'pier',
  'crt_screen',
  'plate',
  'monitor',
  'bulletin_board',
  'shower',
  'radiator',
  'glass',
  'clock',
  'flag',
]
assert len(CLASS_NAMES) == NUM_CLASSES

# mmseg ADE20KDataset.PALETTE (RGB) is the usual ADE colour map; we derive a fixed palette
# instead (deterministic, distinct colours) for the colour-coded masks of predict_segmentation.
_PALETTE_RNG = np.random.default_rng(20160)
PALETTE = _PALETTE_RNG.integers(32, 256, size=(NUM_CLASSES, 3), dtype=np.uint8)


class MissingManualDownloadError(FileNotFoundError):
  """ADEChallengeData2016.zip is not in the manual download directory."""


class InvalidAnnotationError(ValueError):
  """An annotation that does not fit its image or holds values outside 0..150."""


def missing_download_message(manual_dir: str | os.PathLike) -> str:
  return (
    f'ADE20K manual download not found: {Path(manual_dir) / ZIP_NAME} does not exist. Download '
    f'{ZIP_NAME} (923 MB, the SceneParsing ADE20K challenge data) from {ZIP_URL} and put it in '
    f'{manual_dir} (do not unzip it), then rerun: python scripts/prepare_ade20k.py '
    f'--manual_dir={manual_dir} --data_dir=DATA_DIR'
  )


def check_pair(image: np.ndarray | tuple[int, int], label: np.ndarray, what: str) -> None:
  """Raises InvalidAnnotationError if ``label`` [H, W] does not match the image size (an array
  [H, W, ...] or (H, W)) or has values outside 0..150."""
  size = tuple(image.shape[:2]) if isinstance(image, np.ndarray) else tuple(image)
  if label.ndim != 2:
    raise InvalidAnnotationError(
      f'{what}: the label must be a single-channel image, got {label.shape}'
    )
  if tuple(label.shape) != size:
    raise InvalidAnnotationError(
      f'{what}: the image is {size[0]}x{size[1]} but its label is '
      f'{label.shape[0]}x{label.shape[1]}; image and annotation must have the same size'
    )
  high = int(label.max()) if label.size else 0
  if high > NUM_CLASSES:
    bad = np.unique(label[label > NUM_CLASSES])[:8].tolist()
    raise InvalidAnnotationError(
      f'{what}: label values {bad} are outside 0..{NUM_CLASSES} (0 = other, 1..150 = the '
      'ADE20K classes); is this an ADEChallengeData2016 annotation PNG?'
    )


def decode_label(data: bytes) -> np.ndarray:
  """Annotation PNG bytes -> uint8 [H, W] (raw values, 0 = other)."""
  with Image.open(io.BytesIO(data)) as img:
    if img.mode not in ('L', 'P', 'I', 'I;16'):
      raise InvalidAnnotationError(f'annotation PNG has mode {img.mode}, expected a 1-channel PNG')
    array = np.asarray(img)
  if array.dtype != np.uint8:
    if array.max(initial=0) > 255:
      raise InvalidAnnotationError(f'label values up to {array.max()} are outside 0..{NUM_CLASSES}')
    array = array.astype(np.uint8)
  return array


class VcmambaAde20k(tfds.core.GeneratorBasedBuilder):
  """ADE20K SceneParsing (ADEChallengeData2016): images + 150-class annotations."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES: ClassVar[dict[str, str]] = {'1.0.0': 'Initial release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f'Download {ZIP_NAME} from {ZIP_URL} into the manual_dir.'

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description='ADE20K SceneParsing challenge 2016: 150-class semantic segmentation.',
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
          'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
          'file_name': tfds.features.Text(),
        }
      ),
      homepage='http://sceneparsing.csail.mit.edu/',
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    manual_dir = Path(dl_manager.manual_dir)
    path = manual_dir / ZIP_NAME
    if not path.is_file():
      raise MissingManualDownloadError(missing_download_message(manual_dir))
    return {split: self._generate_examples(path, folder) for split, folder in _SPLIT_DIRS.items()}

  def _generate_examples(self, path: Path, folder: str) -> Iterator[tuple[str, dict[str, Any]]]:
    with zipfile.ZipFile(path) as archive:
      names = set(archive.namelist())
      prefix = f'{ROOT}/images/{folder}/'
      images = sorted(n for n in names if n.startswith(prefix) and n.endswith('.jpg'))
      if not images:
        raise InvalidAnnotationError(
          f'{path} has no {prefix}*.jpg: is it ADEChallengeData2016.zip?'
        )
      for name in images:
        stem = name[len(prefix) : -len('.jpg')]
        label_name = f'{ROOT}/annotations/{folder}/{stem}.png'
        if label_name not in names:
          raise InvalidAnnotationError(f'{path}: {name} has no annotation {label_name}')
        image_bytes, label_bytes = archive.read(name), archive.read(label_name)
        with Image.open(io.BytesIO(image_bytes)) as img:
          width, height = img.size
        check_pair((height, width), decode_label(label_bytes), f'{path}:{label_name}')
        yield stem, {'image': image_bytes, 'label': label_bytes, 'file_name': stem}


def prepare_ade20k(
  manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None
) -> Path:
  """Builds ``vcmamba_ade20k`` (ArrayRecord) from ``manual_dir/ADEChallengeData2016.zip``;
  returns the dataset directory (a no-op when already prepared)."""
  manual_dir = Path(manual_dir).expanduser()
  if not (manual_dir / ZIP_NAME).is_file():
    raise MissingManualDownloadError(missing_download_message(manual_dir))
  builder = VcmambaAde20k(
    data_dir=None if data_dir is None else os.fspath(data_dir), file_format='array_record'
  )
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir))
    )
    splits = builder.info.splits
    logging.info(
      'ADE20K: %d train / %d validation records in %s',
      splits['train'].num_examples,
      splits['validation'].num_examples,
      builder.data_dir,
    )
  return Path(builder.data_dir)


def get_ade20k_source(split: str, data_dir: str | os.PathLike | None = None):
  """Random-access source of the prepared dataset: records {'image': JPEG bytes, 'label': PNG
  bytes, 'file_name'}. Raises FileNotFoundError saying how to prepare it."""
  builder = VcmambaAde20k(
    data_dir=None if data_dir is None else os.fspath(data_dir), file_format='array_record'
  )
  if not builder.is_prepared():
    raise FileNotFoundError(
      f'ADE20K is not prepared in data_dir={data_dir or builder.data_dir}. Download {ZIP_NAME} '
      f'from {ZIP_URL} into a directory DIR and run: python scripts/prepare_ade20k.py '
      f'--manual_dir=DIR --data_dir={data_dir or "DATA_DIR"}'
    )
  return tfds.data_source(
    ADE20K,
    split=split,
    data_dir=None if data_dir is None else os.fspath(data_dir),
    download=False,
    decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()},
    builder_kwargs={'file_format': 'array_record'},
  )


# ------------------------------------------------------------------------------------------------
# A synthetic ADEChallengeData2016.zip (tests, demos).
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FakeAde20k:
  manual_dir: Path
  num_train: int
  num_val: int
  classes: tuple[int, ...]  # raw label values used (0 = other included)


def class_colour(value: int) -> np.ndarray:
  """The mean RGB colour of raw class ``value`` in the synthetic images (learnable)."""
  rng = np.random.default_rng((7, value))
  return rng.integers(0, 256, size=3).astype(np.float32)


def fake_pair(
  rng: np.random.Generator, height: int, width: int, classes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """(image uint8 [H, W, 3], raw label uint8 [H, W]): random axis-aligned regions, each of one
  class, coloured with ``class_colour`` plus noise, so that a small model can learn them."""
  label = np.full((height, width), rng.choice(classes), np.uint8)
  for _ in range(int(rng.integers(2, 6))):
    h, w = int(rng.integers(height // 4, height + 1)), int(rng.integers(width // 4, width + 1))
    y, x = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
    label[y : y + h, x : x + w] = rng.choice(classes)
  colours = np.stack([class_colour(c) for c in range(NUM_CLASSES + 1)])
  image = colours[label] + rng.normal(0, 12, size=(height, width, 3))
  return np.clip(image, 0, 255).astype(np.uint8), label


def write_fake_ade20k_manual_dir(
  path: str | os.PathLike,
  *,
  num_train: int = 16,
  num_val: int = 4,
  image_size: tuple[int, int] = (48, 96),
  classes: tuple[int, ...] = (0, 1, 2, 3, 5, 8, 13, 150),
  seed: int = 0,
) -> FakeAde20k:
  """Writes ``path/ADEChallengeData2016.zip`` with the official layout (images/{training,
  validation}/ADE_*.jpg, annotations/.../ADE_*.png, objectInfo150.txt) and synthetic content.

  Args:
    num_train, num_val: images per split.
    image_size: (min, max) side; height and width drawn independently (non-square images).
    classes: raw label values drawn (0 = other is ignored after reduce_zero_label).
    seed: reproducible content.
  """
  manual_dir = Path(path)
  manual_dir.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  with zipfile.ZipFile(manual_dir / ZIP_NAME, 'w') as archive:
    archive.writestr(
      f'{ROOT}/objectInfo150.txt',
      'Idx\tRatio\tTrain\tVal\tName\n'
      + ''.join(f'{i + 1}\t0\t0\t0\t{n}\n' for i, n in enumerate(CLASS_NAMES)),
    )
    for split, count in (('train', num_train), ('val', num_val)):
      folder = 'training' if split == 'train' else 'validation'
      for i in range(1, count + 1):
        height, width = (int(rng.integers(image_size[0], image_size[1] + 1)) for _ in range(2))
        image, label = fake_pair(rng, height, width, classes)
        stem = f'ADE_{split}_{i:08d}'
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format='JPEG', quality=95)
        archive.writestr(f'{ROOT}/images/{folder}/{stem}.jpg', buffer.getvalue())
        buffer = io.BytesIO()
        Image.fromarray(label, mode='L').save(buffer, format='PNG')
        archive.writestr(f'{ROOT}/annotations/{folder}/{stem}.png', buffer.getvalue())
  return FakeAde20k(manual_dir, num_train, num_val, tuple(classes))
