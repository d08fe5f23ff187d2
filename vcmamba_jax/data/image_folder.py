"""A folder of class subfolders as a data source for the grain pipeline (fine-tuning on your data).

Two layouts:

    DIR/train/<class>/*.jpg  and  DIR/val/<class>/*.jpg   (or DIR/validation/): the given split
    DIR/<class>/*.jpg                                     : split deterministically, per class,
                                                            `val_fraction` of the files to
                                                            'validation' (seeded by `split_seed`)

Classes are the subfolder names in sorted order (label i = i-th name). Files are read as
encoded bytes, like TFDS records, so the pipeline's transforms and corrupt-record policy apply
unchanged: a file that is not an image (checked from its header when the folder is opened) is
skipped with one log line; a file that fails to decode later (e.g. truncated) is skipped and
replaced by the pipeline, which logs it and counts it in `num_skipped`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff', '.ppm')
TRAIN_DIRS = ('train',)
VAL_DIRS = ('val', 'validation')
_SPLITS = {'train': 'train', 'val': 'validation', 'validation': 'validation'}


class ImageFolderError(ValueError):
  """An image folder that cannot be used for classification."""


@dataclasses.dataclass(frozen=True)
class ImageFolderSource(Sequence):
  """Random-access records `{'image': encoded bytes, 'label': int32}` of one split."""

  root: str
  split: str
  classes: tuple[str, ...]
  files: tuple[str, ...]  # paths relative to root
  labels: tuple[int, ...]

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = os.path.join(self.root, self.files[index])
    try:
      with open(path, 'rb') as f:
        data = f.read()
    except OSError as e:  # vanished or unreadable since the scan: the pipeline skips it
      logging.warning('image folder: cannot read %s (%s); skipping it', path, e)
      data = b''
    return {'image': data, 'label': np.int32(self.labels[index])}

  def __repr__(self) -> str:
    return f'ImageFolderSource({self.root!r}, {self.split!r}: {len(self)} images, {len(self.classes)} classes)'


def _class_dirs(directory: str) -> list[str]:
  return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))


def _image_files(directory: str) -> list[str]:
  """Image files under `directory` (recursively), relative to it, sorted."""
  out = []
  for parent, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in names:
      if not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS):
        out.append(os.path.relpath(os.path.join(parent, name), directory))
  return sorted(out)


def _unreadable(path: str) -> str | None:
  """Why `path` is not an image (from its header), or None."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as image:
      if image.size[0] < 1 or image.size[1] < 1:
        return 'empty image'
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
    return f'{type(e).__name__}: {e}'
  return None


def _scan(root: str, directory: str, classes: Sequence[str]) -> tuple[list[str], list[int]]:
  files, labels = [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(directory, name)
    if not os.path.isdir(class_dir):
      continue
    for rel in _image_files(class_dir):
      files.append(os.path.relpath(os.path.join(class_dir, rel), root))
      labels.append(label)
  with concurrent.futures.ThreadPoolExecutor(16) as pool:
    reasons = list(pool.map(lambda f: _unreadable(os.path.join(root, f)), files))
  kept = [(f, label) for f, label, why in zip(files, labels, reasons) if why is None]
  for f, why in zip(files, reasons):
    if why is not None:
      logging.warning(
        'image folder: skipping %s, not a readable image (%s)', os.path.join(root, f), why
      )
  return [f for f, _ in kept], [label for _, label in kept]


def _check_classes(root: str, classes: Sequence[str]) -> None:
  if len(classes) < 2:
    found = f'only {list(classes)}' if classes else 'no class subfolders'
    raise ImageFolderError(
      f'image folder {root} has {found}: a classifier needs at least 2 classes, one subfolder '
      'per class (DIR/<class>/*.jpg, or DIR/train/<class>/ and DIR/val/<class>/)'
    )


@dataclasses.dataclass(frozen=True)
class ImageFolder:
  """The scanned folder: class names and the files of both splits."""

  root: str
  classes: tuple[str, ...]
  splits: dict[str, tuple[tuple[str, ...], tuple[int, ...]]]

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def source(self, split: str) -> ImageFolderSource:
    if split not in _SPLITS:
      raise ImageFolderError(
        f'image folders have the splits train and validation (or val), not {split!r}'
      )
    files, labels = self.splits[_SPLITS[split]]
    return ImageFolderSource(self.root, _SPLITS[split], self.classes, files, labels)


def _split_by_class(
  files: list[str], labels: list[int], num_classes: int, val_fraction: float, seed: int
) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """Per class, `round(val_fraction * n)` files (at least 1) to validation, chosen by a
  permutation seeded by (seed, class index): independent of listing order and of other classes."""
  train, val = [], []
  for label in range(num_classes):
    members = sorted(f for f, lab in zip(files, labels) if lab == label)
    order = np.random.default_rng((seed, label)).permutation(len(members))
    num_val = min(max(1, round(val_fraction * len(members))), len(members) - 1)
    picked = set(order[:num_val].tolist())
    for i, f in enumerate(members):
      (val if i in picked else train).append((f, label))
  return {
    'train': (tuple(f for f, _ in train), tuple(lab for _, lab in train)),
    'validation': (tuple(f for f, _ in val), tuple(lab for _, lab in val)),
  }


def open_image_folder(
  root: str | os.PathLike, *, val_fraction: float = 0.1, split_seed: int = 0
) -> ImageFolder:
  """Scans an image folder (see the module docstring for the layouts); the scan of a folder is
  done once per process.

  Args:
    root: the folder.
    val_fraction: share of each class held out for validation when the folder has no
      train/ and val/ subfolders.
    split_seed: seeds that hold-out (the same seed gives the same split on every machine).

  Raises:
    ImageFolderError: fewer than 2 classes, a class without readable images, validation classes
      missing from train, or a class too small to split.
  """
  root = os.path.abspath(os.path.expanduser(os.fspath(root)))
  return _open(root, float(val_fraction), int(split_seed))


@functools.lru_cache(maxsize=8)
def _open(root: str, val_fraction: float, split_seed: int) -> ImageFolder:
  if not os.path.isdir(root):
    raise FileNotFoundError(f'image folder {root} does not exist')
  subdirs = _class_dirs(root)
  train_dir = next((d for d in TRAIN_DIRS if d in subdirs), None)
  val_dir = next((d for d in VAL_DIRS if d in subdirs), None)
  if train_dir and val_dir:
    classes = tuple(_class_dirs(os.path.join(root, train_dir)))
    _check_classes(os.path.join(root, train_dir), classes)
    extra = sorted(set(_class_dirs(os.path.join(root, val_dir))) - set(classes))
    if extra:
      raise ImageFolderError(
        f'{os.path.join(root, val_dir)} has classes that {train_dir}/ lacks: {extra[:10]}'
      )
    splits = {}
    for split, directory in (('train', train_dir), ('validation', val_dir)):
      files, labels = _scan(root, os.path.join(root, directory), classes)
      splits[split] = (tuple(files), tuple(labels))
    if not splits['validation'][0]:
      raise ImageFolderError(f'{os.path.join(root, val_dir)} holds no readable images')
  else:
    if train_dir or val_dir:
      raise ImageFolderError(
        f'{root} has a {train_dir or val_dir}/ subfolder but no '
        f'{"val/" if train_dir else "train/"}: give both, or put the class folders at the top'
      )
    classes = tuple(subdirs)
    _check_classes(root, classes)
    if not 0 < val_fraction < 1:
      raise ImageFolderError(
        f'val_fraction must be in (0, 1) to hold out validation images from {root}, got '
        f'{val_fraction} (or give train/ and val/ subfolders)'
      )
    files, labels = _scan(root, root, classes)
    counts = np.bincount(labels, minlength=len(classes)) if labels else np.zeros(len(classes))
    small = [classes[i] for i in np.flatnonzero(counts < 2)]
    if small:
      raise ImageFolderError(
        f'image folder {root}: classes {small[:10]} have fewer than 2 readable images '
        f'({IMAGE_EXTENSIONS}); each class needs one for training and one for validation'
      )
    splits = _split_by_class(files, labels, len(classes), val_fraction, split_seed)
  counts = np.bincount(splits['train'][1], minlength=len(classes))
  empty = [classes[i] for i in np.flatnonzero(counts == 0)]
  if empty:
    raise ImageFolderError(
      f'image folder {root}: no readable training images for classes {empty[:10]}'
    )
  logging.info(
    'image folder %s: %d classes, %d train / %d validation images',
    root,
    len(classes),
    len(splits['train'][0]),
    len(splits['validation'][0]),
  )
  return ImageFolder(root, classes, splits)
