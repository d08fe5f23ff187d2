"""mmseg's ADE20K transforms on the host (numpy), image and label kept aligned.

Train (``SegTrainTransform``, mmseg 0.29.1 / the authors' config), in order:
  LoadAnnotations(reduce_zero_label=True)      raw 0 -> 255 (ignored), k -> k - 1
  Resize(img_scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio)   image bilinear, label nearest
  RandomCrop(512, cat_max_ratio=0.75)          up to 10 redraws until no class covers >= 75%
  RandomFlip(0.5)                              horizontal, both
  PhotoMetricDistortion                        brightness, contrast (before or after), saturation, hue
  Pad(512, pad_val=0, seg_pad_val=255)         bottom/right; the image padding is 0 AFTER
                                               normalisation, so the batch carries each crop's
                                               real ``size`` and the device zeroes the padding
  Normalize (mean/std, BGR->RGB)               on the device (``vcmamba_jax.data.normalize``)

Test (``SegEvalTransform``): AlignResize((2048, 512), keep_ratio, size_divisor 32): rescale so
that the long side <= 2048 and the short side <= 512, then resize to the next multiple of 32;
the label stays at its original size (metrics are computed there, mmseg's ``rescale=True``).

Resizing follows OpenCV's (mmcv's backend) definitions without antialiasing: bilinear with
half-pixel centres, nearest with ``floor(dst * in / out)``. Decoding uses PIL (mmcv: OpenCV),
so JPEG pixels can differ by a rounding step from the authors' pipeline.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vcmamba_jax.data.transforms import decode_image
from vcmamba_jax.segmentation.ade20k import check_pair, decode_label

IGNORE_INDEX = 255


# ---------------------------------------------------------------------------------------------
# Geometry.
# ---------------------------------------------------------------------------------------------
def rescale_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv ``imrescale`` output (height, width): the largest keep-ratio size with long side <=
  max(scale) and short side <= min(scale), rounded half up."""
  factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
  return int(height * factor + 0.5), int(width * factor + 0.5)


def align_size(height: int, width: int, divisor: int = 32) -> tuple[int, int]:
  return int(np.ceil(height / divisor)) * divisor, int(np.ceil(width / divisor)) * divisor


def eval_size(height: int, width: int, scale=(2048, 512), divisor: int = 32) -> tuple[int, int]:
  """Size of an image after AlignResize (the test transform)."""
  return align_size(*rescale_size(height, width, scale), divisor)


def _bilinear_axis(in_size: int, out_size: int):
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size) + 0.5) * scale - 0.5, 0.0)
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  return i0, i1, (src - i0).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """uint8 [H, W, C] -> uint8 [h, w, C], bilinear with half-pixel centres, no antialiasing
  (cv2.INTER_LINEAR), rounded to nearest."""
  height, width = size
  if image.shape[:2] == (height, width):
    return image
  r0, r1, rw = _bilinear_axis(image.shape[0], height)
  c0, c1, cw = _bilinear_axis(image.shape[1], width)
  x = image.astype(np.float32)
  x = x[r0] * (1 - rw)[:, None, None] + x[r1] * rw[:, None, None]
  x = x[:, c0] * (1 - cw)[None, :, None] + x[:, c1] * cw[None, :, None]
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """[H, W] -> [h, w], cv2.INTER_NEAREST: source index floor(dst * in / out)."""
  height, width = size
  rows = np.minimum(
    (np.arange(height) * (label.shape[0] / height)).astype(np.int64), label.shape[0] - 1
  )
  cols = np.minimum(
    (np.arange(width) * (label.shape[1] / width)).astype(np.int64), label.shape[1] - 1
  )
  return label[rows][:, cols]


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
  """uint8 raw ADE20K label -> 0..149 with 255 ignored (0 "other" -> 255)."""
  label = label.astype(np.int16)
  out = label - 1
  out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
  return out.astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# PhotoMetricDistortion (OpenCV's uint8 HSV: H in [0, 180), S and V in [0, 255]).
# ---------------------------------------------------------------------------------------------
def _convert(image: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
  return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
  x = image.astype(np.float32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = x.max(-1)
  delta = v - x.min(-1)
  s = np.where(v > 0, delta * 255.0 / np.maximum(v, 1e-6), 0.0)
  safe = np.maximum(delta, 1e-6)
  h = np.where(
    v == r,
    60.0 * (g - b) / safe,
    np.where(v == g, 120.0 + 60.0 * (b - r) / safe, 240.0 + 60.0 * (r - g) / safe),
  )
  h = np.where(delta > 0, np.mod(h, 360.0), 0.0)
  out = np.stack([np.rint(h / 2.0) % 180, np.rint(s), v], -1)
  return out.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
  h = hsv[..., 0].astype(np.float32) * 2.0
  s = hsv[..., 1].astype(np.float32) / 255.0
  v = hsv[..., 2].astype(np.float32)
  c = v * s
  hp = h / 60.0
  x = c * (1 - np.abs(np.mod(hp, 2) - 1))
  zeros = np.zeros_like(c)
  sector = np.floor(hp).astype(np.int64) % 6
  table = [(c, x, zeros), (x, c, zeros), (zeros, c, x), (zeros, x, c), (x, zeros, c), (c, zeros, x)]
  rgb = np.zeros(h.shape + (3,), np.float32)
  for k, (rr, gg, bb) in enumerate(table):
    m = sector == k
    rgb[m] = np.stack([rr[m], gg[m], bb[m]], -1)
  rgb += (v - c)[..., None]
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PhotoMetricDistortion:
  """mmseg PhotoMetricDistortion, each step applied with probability 1/2, in mmseg's order."""

  brightness_delta: int = 32
  contrast_range: tuple[float, float] = (0.5, 1.5)
  saturation_range: tuple[float, float] = (0.5, 1.5)
  hue_delta: int = 18

  def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    def contrast(img):
      if rng.integers(2):
        return _convert(img, alpha=rng.uniform(*self.contrast_range))
      return img

    if rng.integers(2):
      image = _convert(image, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
    mode = rng.integers(2)
    if mode == 1:
      image = contrast(image)
    if rng.integers(2):
      hsv = rgb_to_hsv(image)
      hsv[..., 1] = _convert(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
      image = hsv_to_rgb(hsv)
    if rng.integers(2):
      hsv = rgb_to_hsv(image)
      shift = int(rng.integers(-self.hue_delta, self.hue_delta))
      hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
      image = hsv_to_rgb(hsv)
    if mode == 0:
      image = contrast(image)
    return image


# ---------------------------------------------------------------------------------------------
# Train and eval transforms.
# ---------------------------------------------------------------------------------------------
def decode_pair(image_bytes: bytes, label_bytes: bytes, what: str = 'record'):
  """(image uint8 [H, W, 3], raw label uint8 [H, W]), checked (size, values 0..150)."""
  image = decode_image(image_bytes)
  label = decode_label(label_bytes)
  check_pair(image, label, what)
  return image, label


@dataclasses.dataclass(frozen=True)
class SegTrainTransform:
  """The authors' ADE20K train pipeline (see the module docstring). Picklable.

  ``__call__(image, raw_label, rng)`` with decoded uint8 arrays returns (image uint8 [crop, crop,
  3] zero-padded, label uint8 [crop, crop] padded with 255, size int32 [2] = the real crop size).
  """

  crop_size: int = 512
  scale: tuple[int, int] = (2048, 512)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  cat_max_ratio: float = 0.75
  flip_prob: float = 0.5
  photometric: bool = True
  reduce_zero_label: bool = True

  def crop_box(self, shape, rng: np.random.Generator) -> tuple[int, int, int, int]:
    margin_h, margin_w = max(shape[0] - self.crop_size, 0), max(shape[1] - self.crop_size, 0)
    y = int(rng.integers(0, margin_h + 1))
    x = int(rng.integers(0, margin_w + 1))
    return y, min(y + self.crop_size, shape[0]), x, min(x + self.crop_size, shape[1])

  def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    check_pair(image, label, 'train example')
    if self.reduce_zero_label:
      label = reduce_zero_label(label)
    # Resize: a random ratio of the scale, then keep-ratio rescale.
    ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
    scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
    size = rescale_size(image.shape[0], image.shape[1], scale)
    image, label = resize_bilinear(image, size), resize_nearest(label, size)
    # RandomCrop with cat_max_ratio: redraw (up to 10 times) crops dominated by one class.
    box = self.crop_box(label.shape, rng)
    if self.cat_max_ratio < 1.0:
      for _ in range(10):
        y1, y2, x1, x2 = box
        values, counts = np.unique(label[y1:y2, x1:x2], return_counts=True)
        counts = counts[values != IGNORE_INDEX]
        if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
          break
        box = self.crop_box(label.shape, rng)
    y1, y2, x1, x2 = box
    image, label = image[y1:y2, x1:x2], label[y1:y2, x1:x2]
    if rng.random() < self.flip_prob:
      image, label = image[:, ::-1], label[:, ::-1]
    if self.photometric:
      image = PhotoMetricDistortion()(np.ascontiguousarray(image), rng)
    out_image = np.zeros((self.crop_size, self.crop_size, 3), np.uint8)
    out_label = np.full((self.crop_size, self.crop_size), IGNORE_INDEX, np.uint8)
    h, w = label.shape
    out_image[:h, :w], out_label[:h, :w] = image, label
    return out_image, out_label, np.array([h, w], np.int32)


@dataclasses.dataclass(frozen=True)
class SegEvalTransform:
  """AlignResize test transform onto fixed canvases (static shapes for the jitted eval).

  ``__call__(image, raw_label)`` returns image uint8 [*image_canvas, 3] (resized image top-left,
  zeros elsewhere), label uint8 [*label_canvas] (the RAW label at its original size, 255
  elsewhere: ignored), size int32 [2] (resized) and orig_size int32 [2].
  """

  image_canvas: tuple[int, int] = (2048, 2048)
  label_canvas: tuple[int, int] = (2048, 2048)
  scale: tuple[int, int] = (2048, 512)
  size_divisor: int = 32

  def __call__(self, image: np.ndarray, label: np.ndarray):
    check_pair(image, label, 'eval example')
    height, width = label.shape
    size = eval_size(height, width, self.scale, self.size_divisor)
    if size[0] > self.image_canvas[0] or size[1] > self.image_canvas[1]:
      raise ValueError(f'resized image {size} does not fit the eval canvas {self.image_canvas}')
    if height > self.label_canvas[0] or width > self.label_canvas[1]:
      raise ValueError(
        f'a {height}x{width} label does not fit the eval label canvas {self.label_canvas}; '
        'raise config.eval.label_canvas'
      )
    resized = resize_bilinear(resize_bilinear(image, rescale_size(height, width, self.scale)), size)
    out_image = np.zeros(self.image_canvas + (3,), np.uint8)
    out_image[: size[0], : size[1]] = resized
    out_label = np.full(self.label_canvas, IGNORE_INDEX, np.uint8)
    out_label[:height, :width] = label
    return out_image, out_label, np.array(size, np.int32), np.array([height, width], np.int32)
