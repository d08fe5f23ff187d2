"""Host-side, per-example image transforms (decode, crop, flip, RandAugment, eval resize).

Everything here works on ENCODED image bytes (or PIL images / uint8 arrays) and returns uint8
HxWx3 RGB arrays; normalisation, random erasing and mixup/cutmix run later on the device
(`device_ops.py`). The semantics follow timm's `create_transform` as used by DeiT/VCMamba:

- train: `RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3), bicubic)`, horizontal flip
  p=0.5, RandAugment `rand-m9-mstd0.5-inc1`;
- eval: resize the shorter side to `int(image_size / crop_pct)` (bicubic), centre crop.

All randomness comes from an explicit `np.random.Generator`, so a transform is a pure function of
(bytes, generator state): the pipeline seeds one generator per example from (seed, position).

Decoding is "only what the crop needs": for JPEGs the crop box is drawn from the header size, then
libjpeg's DCT-domain downscaling (`PIL.Image.draft`, 1/2, 1/4 or 1/8) is used whenever the crop is
at least 2x larger than the output, and the crop is resampled with a sub-pixel `box` so that its
geometry stays exact in original-image coordinates.
"""

from __future__ import annotations

import functools
import importlib.resources
import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# timm's `img_mean` for RandAugment fills: round(255 * IMAGENET_MEAN) = (124, 116, 104).
IMAGENET_MEAN_PIXEL: tuple[int, int, int] = (124, 116, 104)

# DeiT/VCMamba recipe defaults.
DEFAULT_RANDAUGMENT = 'rand-m9-mstd0.5-inc1'
DEFAULT_CROP_PCT = 0.875
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)

_RESAMPLE = {
  'bicubic': Image.Resampling.BICUBIC,
  'bilinear': Image.Resampling.BILINEAR,
  'nearest': Image.Resampling.NEAREST,
}
# JPEG DCT scaling factors supported by libjpeg through PIL's `draft`.
_DRAFT_SCALES = (8, 4, 2, 1)


class ImageDecodeError(ValueError):
  """The bytes of a record are not a decodable image (corrupt, truncated or unknown format)."""


# ------------------------------------------------------------------------------------------------
# Decoding and colour conversion.
# ------------------------------------------------------------------------------------------------


def to_rgb(img: Image.Image) -> Image.Image:
  """Converts any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) to 8-bit RGB.

  Alpha is dropped (as torchvision/timm `convert('RGB')` do). 16/32-bit single-channel images are
  rescaled from their 16-bit range instead of being clipped at 255 (PIL's default).
  """
  if img.mode == 'RGB':
    return img
  if img.mode == 'P':
    # Palette images with a transparency entry must go through RGBA (PIL warns otherwise).
    img = img.convert('RGBA')
  elif img.mode in ('I', 'F') or img.mode.startswith('I;16'):
    pixels = np.asarray(img, dtype=np.float64)
    if pixels.size and pixels.max() > 255:
      pixels = pixels / 257.0  # 65535 -> 255
    img = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode='L')
  return img.convert('RGB')


def _open(data: bytes) -> Image.Image:
  try:
    return Image.open(io.BytesIO(data))
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise ImageDecodeError(
      f'cannot open image ({len(data)} bytes, starts with {bytes(data[:4])!r}): {e}'
    ) from e


def _choose_draft_scale(crop_w: float, crop_h: float, out_w: int, out_h: int) -> int:
  """Largest JPEG DCT scale s with crop/s still >= output size (so we only ever downsample)."""
  for scale in _DRAFT_SCALES:
    if crop_w / scale >= out_w and crop_h / scale >= out_h:
      return scale
  return 1


def _load_rgb(img: Image.Image, scale: int = 1) -> tuple[Image.Image, float]:
  """Decodes `img` (at 1/scale if it is a JPEG) to RGB; returns (image, actual scale)."""
  actual_scale = 1.0
  try:
    if scale > 1 and img.format == 'JPEG':
      width, _ = img.size
      # Requesting floor(W/s) makes PIL pick exactly s (W // floor(W/s) is in [s, 2s)).
      drafted = img.draft(None, (img.size[0] // scale, img.size[1] // scale))
      if drafted is not None:
        # `drafted[1]` is the original image's extent in reduced coordinates (W/s, H/s).
        actual_scale = width / drafted[1][2]
    img.load()
    return to_rgb(img), actual_scale
  except Exception as e:
    raise ImageDecodeError(f'cannot decode {img.format} image of size {img.size}: {e}') from e


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes to a uint8 [H, W, 3] RGB array (raises ImageDecodeError)."""
  img, _ = _load_rgb(_open(data))
  return np.asarray(img, dtype=np.uint8)


def _as_pil(image: Image.Image | np.ndarray | bytes) -> Image.Image:
  """PIL image (not yet loaded for bytes) from bytes, a PIL image or a uint8 array."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    return _open(bytes(image))
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8:
      raise TypeError(
        f'expected a uint8 image array (0-255), got dtype {image.dtype}; convert it with '
        '`np.clip(x * 255, 0, 255).astype(np.uint8)` if it is a float image in [0, 1]'
      )
    if image.ndim == 3 and image.shape[-1] == 1:
      image = image[..., 0]
    if image.ndim == 2:
      return Image.fromarray(image, mode='L')
    if image.ndim == 3 and image.shape[-1] in (3, 4):
      return Image.fromarray(image, mode='RGB' if image.shape[-1] == 3 else 'RGBA')
    raise ValueError(
      f'expected an image array of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], '
      f'got {image.shape}'
    )
  raise TypeError(f'expected encoded bytes, a PIL image or a uint8 array, got {type(image)}')


# ------------------------------------------------------------------------------------------------
# RandomResizedCrop (timm `RandomResizedCropAndInterpolation`).
# ------------------------------------------------------------------------------------------------


def random_resized_crop_box(
  rng: np.random.Generator,
  width: int,
  height: int,
  scale: tuple[float, float] = RRC_SCALE,
  ratio: tuple[float, float] = RRC_RATIO,
  max_attempts: int = 10,
) -> tuple[int, int, int, int]:
  """Samples a crop box as timm/torchvision RandomResizedCrop do.

  Up to `max_attempts` times: area fraction ~ U(scale), aspect ratio (w/h) log-uniform in `ratio`,
  w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); accepted if it fits, at a uniform
  integer offset. Otherwise the central crop of the whole image clamped to the ratio range.

  Returns:
    (top, left, crop_height, crop_width) in pixels of the original image.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(max_attempts):
    target_area = rng.uniform(scale[0], scale[1]) * area
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_w = round(math.sqrt(target_area * aspect))
    crop_h = round(math.sqrt(target_area / aspect))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = int(rng.integers(0, height - crop_h + 1))
      left = int(rng.integers(0, width - crop_w + 1))
      return top, left, crop_h, crop_w
  # Fallback: central crop with the aspect ratio clamped to `ratio`.
  in_ratio = width / height
  if in_ratio < min(ratio):
    crop_w = width
    crop_h = round(crop_w / min(ratio))
  elif in_ratio > max(ratio):
    crop_h = height
    crop_w = round(crop_h * max(ratio))
  else:
    crop_w, crop_h = width, height
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def decode_random_resized_crop(
  data: bytes | Image.Image,
  rng: np.random.Generator,
  size: int,
  *,
  scale: tuple[float, float] = RRC_SCALE,
  ratio: tuple[float, float] = RRC_RATIO,
  interpolation: str = 'bicubic',
  reduced_decode: bool = True,
) -> tuple[Image.Image, tuple[int, int, int, int]]:
  """Decodes an image and applies RandomResizedCrop, decoding only what the crop needs.

  The crop box is sampled from the header size; for JPEGs the image is decoded at 1/2, 1/4 or 1/8
  resolution when the crop is at least that many times larger than `size` (`reduced_decode`).

  Returns:
    (RGB PIL image of size x size, crop box (top, left, h, w) in original pixels).
  """
  img = data if isinstance(data, Image.Image) else _open(data)
  width, height = img.size
  top, left, crop_h, crop_w = random_resized_crop_box(rng, width, height, scale, ratio)
  draft = _choose_draft_scale(crop_w, crop_h, size, size) if reduced_decode else 1
  img, actual = _load_rgb(img, draft)
  box = (left / actual, top / actual, (left + crop_w) / actual, (top + crop_h) / actual)
  out = img.resize((size, size), resample=_RESAMPLE[interpolation], box=box)
  return out, (top, left, crop_h, crop_w)


# ------------------------------------------------------------------------------------------------
# RandAugment (timm `auto_augment.rand_augment_transform`).
# ------------------------------------------------------------------------------------------------

_LEVEL_DENOM = 10.0  # timm: magnitudes live in [0, 10]


def _randomly_negate(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() > 0.5 else value


# Level -> argument functions (timm `_*_level_to_arg`), written from their documented ranges.
def _rotate_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (_randomly_negate(level / _LEVEL_DENOM * 30.0, rng),)  # +-30 degrees


def _shear_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (_randomly_negate(level / _LEVEL_DENOM * 0.3, rng),)  # +-0.3 shear factor


def _translate_rel_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (_randomly_negate(level / _LEVEL_DENOM * hp['translate_pct'], rng),)


def _enhance_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (level / _LEVEL_DENOM * 1.8 + 0.1,)  # [0.1, 1.9]


def _enhance_increasing_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  # 1.0 is identity; stronger levels move further from it in either direction, kept >= 0.1.
  return (max(0.1, 1.0 + _randomly_negate(level / _LEVEL_DENOM * 0.9, rng)),)


def _posterize_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (int(level / _LEVEL_DENOM * 4),)  # bits kept: 0..4


def _posterize_increasing_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (4 - _posterize_arg(level, rng, hp)[0],)  # 4..0 bits: stronger with level


def _solarize_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (int(level / _LEVEL_DENOM * 256),)  # threshold


def _solarize_increasing_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (256 - _solarize_arg(level, rng, hp)[0],)


def _solarize_add_arg(level: float, rng: np.random.Generator, hp: dict[str, Any]) -> tuple:
  return (int(level / _LEVEL_DENOM * 110),)


# Image ops. Geometric ops take `fill` (RGB tuple) and `resample` keywords; others ignore them.
def _affine(img: Image.Image, matrix: tuple, fill: tuple, resample: int) -> Image.Image:
  return img.transform(img.size, Image.Transform.AFFINE, matrix, resample, fillcolor=fill)


def _op_auto_contrast(img: Image.Image, **_: Any) -> Image.Image:
  return ImageOps.autocontrast(img)


def _op_equalize(img: Image.Image, **_: Any) -> Image.Image:
  return ImageOps.equalize(img)


def _op_invert(img: Image.Image, **_: Any) -> Image.Image:
  return ImageOps.invert(img)


def _op_rotate(img: Image.Image, degrees: float, *, fill: tuple, resample: int) -> Image.Image:
  return img.rotate(degrees, resample=resample, fillcolor=fill)


def _op_posterize(img: Image.Image, bits: int, **_: Any) -> Image.Image:
  if bits >= 8:
    return img
  # Keep the `bits` most significant bits. A LUT rather than ImageOps.posterize, which rejects
  # bits=0 in recent Pillow; 0 bits (PosterizeIncreasing at magnitude 10) gives a black image,
  # as it did in the Pillow versions timm was written against.
  mask = (0xFF << (8 - max(0, bits))) & 0xFF
  return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _op_solarize(img: Image.Image, threshold: int, **_: Any) -> Image.Image:
  return ImageOps.solarize(img, threshold)


def _op_solarize_add(img: Image.Image, add: int, threshold: int = 128, **_: Any) -> Image.Image:
  lut = [min(255, i + add) if i < threshold else i for i in range(256)]
  return img.point(lut * len(img.getbands()))


def _op_color(img: Image.Image, factor: float, **_: Any) -> Image.Image:
  return ImageEnhance.Color(img).enhance(factor)


def _op_contrast(img: Image.Image, factor: float, **_: Any) -> Image.Image:
  return ImageEnhance.Contrast(img).enhance(factor)


def _op_brightness(img: Image.Image, factor: float, **_: Any) -> Image.Image:
  return ImageEnhance.Brightness(img).enhance(factor)


def _op_sharpness(img: Image.Image, factor: float, **_: Any) -> Image.Image:
  return ImageEnhance.Sharpness(img).enhance(factor)


def _op_shear_x(img: Image.Image, factor: float, *, fill: tuple, resample: int) -> Image.Image:
  return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _op_shear_y(img: Image.Image, factor: float, *, fill: tuple, resample: int) -> Image.Image:
  return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _op_translate_x_rel(img: Image.Image, pct: float, *, fill: tuple, resample: int) -> Image.Image:
  return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def _op_translate_y_rel(img: Image.Image, pct: float, *, fill: tuple, resample: int) -> Image.Image:
  return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


LevelFn = Callable[[float, np.random.Generator, dict[str, Any]], tuple]
# name -> (image op, level-to-argument function or None for ops without a magnitude).
RANDAUGMENT_OPS: dict[str, tuple[Callable[..., Image.Image], LevelFn | None]] = {
  'AutoContrast': (_op_auto_contrast, None),
  'Equalize': (_op_equalize, None),
  'Invert': (_op_invert, None),
  'Rotate': (_op_rotate, _rotate_arg),
  'Posterize': (_op_posterize, _posterize_arg),
  'PosterizeIncreasing': (_op_posterize, _posterize_increasing_arg),
  'Solarize': (_op_solarize, _solarize_arg),
  'SolarizeIncreasing': (_op_solarize, _solarize_increasing_arg),
  'SolarizeAdd': (_op_solarize_add, _solarize_add_arg),
  'Color': (_op_color, _enhance_arg),
  'ColorIncreasing': (_op_color, _enhance_increasing_arg),
  'Contrast': (_op_contrast, _enhance_arg),
  'ContrastIncreasing': (_op_contrast, _enhance_increasing_arg),
  'Brightness': (_op_brightness, _enhance_arg),
  'BrightnessIncreasing': (_op_brightness, _enhance_increasing_arg),
  'Sharpness': (_op_sharpness, _enhance_arg),
  'SharpnessIncreasing': (_op_sharpness, _enhance_increasing_arg),
  'ShearX': (_op_shear_x, _shear_arg),
  'ShearY': (_op_shear_y, _shear_arg),
  'TranslateXRel': (_op_translate_x_rel, _translate_rel_arg),
  'TranslateYRel': (_op_translate_y_rel, _translate_rel_arg),
}
_GEOMETRIC_OPS = frozenset({'Rotate', 'ShearX', 'ShearY', 'TranslateXRel', 'TranslateYRel'})

# timm `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS` (Cutout is left to random erasing).
RAND_OPS: tuple[str, ...] = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'Posterize',
  'Solarize',
  'SolarizeAdd',
  'Color',
  'Contrast',
  'Brightness',
  'Sharpness',
  'ShearX',
  'ShearY',
  'TranslateXRel',
  'TranslateYRel',
)
RAND_INCREASING_OPS: tuple[str, ...] = (
  'AutoContrast',
  'Equalize',
  'Invert',
  'Rotate',
  'PosterizeIncreasing',
  'SolarizeIncreasing',
  'SolarizeAdd',
  'ColorIncreasing',
  'ContrastIncreasing',
  'BrightnessIncreasing',
  'SharpnessIncreasing',
  'ShearX',
  'ShearY',
  'TranslateXRel',
  'TranslateYRel',
)


class RandAugment:
  """timm-style RandAugment on PIL RGB images.

  Per image: `num_layers` op names are drawn uniformly WITH replacement (timm's behaviour when no
  choice weights are given); each op is applied with probability `prob`; its magnitude is
  N(magnitude, magnitude_std) clipped to [0, magnitude_max] (re-drawn per application); signed
  ops get a random sign. Geometric ops fill with `fill` and resample with `interpolation`
  ('bicubic' as in the DeiT recipe, or 'random' for timm's per-op bilinear/bicubic choice).
  """

  def __init__(
    self,
    *,
    num_layers: int = 2,
    magnitude: float = 9.0,
    magnitude_std: float = 0.5,
    magnitude_max: float = _LEVEL_DENOM,
    prob: float = 0.5,
    ops: Sequence[str] = RAND_INCREASING_OPS,
    translate_pct: float = 0.45,
    fill: tuple[int, int, int] = IMAGENET_MEAN_PIXEL,
    interpolation: str = 'bicubic',
  ):
    unknown = [name for name in ops if name not in RANDAUGMENT_OPS]
    if unknown:
      raise ValueError(f'unknown RandAugment ops {unknown}; known: {sorted(RANDAUGMENT_OPS)}')
    if interpolation not in ('bicubic', 'bilinear', 'random'):
      raise ValueError(
        f"interpolation must be 'bicubic', 'bilinear' or 'random', got {interpolation!r}"
      )
    self.num_layers = num_layers
    self.magnitude = magnitude
    self.magnitude_std = magnitude_std
    self.magnitude_max = magnitude_max
    self.prob = prob
    self.ops = tuple(ops)
    self.fill = tuple(fill)
    self.interpolation = interpolation
    self.hparams = {'translate_pct': translate_pct}

  def __repr__(self) -> str:
    return (
      f'RandAugment(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, '
      f'mmax={self.magnitude_max}, p={self.prob}, ops={list(self.ops)})'
    )

  def _resample(self, rng: np.random.Generator) -> int:
    if self.interpolation == 'random':
      return (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)[int(rng.integers(0, 2))]
    return _RESAMPLE[self.interpolation]

  def apply_op(self, img: Image.Image, name: str, rng: np.random.Generator) -> Image.Image:
    """Applies one op (with its probability, magnitude noise and random sign) to `img`."""
    if self.prob < 1.0 and rng.random() > self.prob:
      return img
    op, level_fn = RANDAUGMENT_OPS[name]
    magnitude = self.magnitude
    if self.magnitude_std == float('inf'):
      magnitude = rng.uniform(0.0, magnitude)
    elif self.magnitude_std > 0:
      magnitude = rng.normal(magnitude, self.magnitude_std)
    magnitude = min(max(0.0, magnitude), self.magnitude_max)
    args = level_fn(magnitude, rng, self.hparams) if level_fn is not None else ()
    if name in _GEOMETRIC_OPS:
      return op(img, *args, fill=self.fill, resample=self._resample(rng))
    return op(img, *args)

  def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Returns the augmented RGB PIL image (same size)."""
    for index in rng.integers(0, len(self.ops), size=self.num_layers):
      img = self.apply_op(img, self.ops[int(index)], rng)
    return img


def parse_randaugment(config: str, **overrides: Any) -> RandAugment:
  """Builds a RandAugment from a timm config string such as 'rand-m9-mstd0.5-inc1'.

  Sections after 'rand': m<magnitude>, n<num_layers>, mstd<std> ('inf' or > 100: uniform),
  mmax<max magnitude>, p<op probability>, inc<0|1> (timm's "increasing" op set, default 0).
  Keyword `overrides` (e.g. `fill`, `interpolation`, `translate_pct`) go to `RandAugment`.
  """
  sections = config.split('-')
  if sections[0] != 'rand':
    raise ValueError(f"RandAugment config must start with 'rand', got {config!r}")
  kwargs: dict[str, Any] = {}
  increasing = False
  for section in sections[1:]:
    match = re.fullmatch(r'([a-z]+)([\d.]+|inf)', section)
    if not match:
      raise ValueError(f'cannot parse section {section!r} of RandAugment config {config!r}')
    key, value = match.groups()
    if key == 'mstd':
      # timm: a std above 100 (or 'inf') means magnitudes uniform in [0, magnitude].
      kwargs['magnitude_std'] = float('inf') if float(value) > 100 else float(value)
    elif key == 'mmax':
      kwargs['magnitude_max'] = float(value)
    elif key == 'm':
      kwargs['magnitude'] = float(value)
    elif key == 'n':
      kwargs['num_layers'] = int(value)
    elif key == 'p':
      kwargs['prob'] = float(value)
    elif key == 'inc':
      increasing = bool(int(value))
    else:
      raise ValueError(
        f'unsupported RandAugment section {section!r} in {config!r} '
        '(supported: m, n, mstd, mmax, p, inc)'
      )
  kwargs['ops'] = RAND_INCREASING_OPS if increasing else RAND_OPS
  kwargs.update(overrides)
  return RandAugment(**kwargs)


# ------------------------------------------------------------------------------------------------
# Train / eval transforms (picklable: used inside grain worker processes).
# ------------------------------------------------------------------------------------------------


class TrainTransform:
  """Encoded bytes -> uint8 [size, size, 3]: RandomResizedCrop, h-flip, RandAugment.

  Raises ImageDecodeError for undecodable bytes (the pipeline skips and counts those).
  """

  def __init__(
    self,
    image_size: int = 224,
    *,
    scale: tuple[float, float] = RRC_SCALE,
    ratio: tuple[float, float] = RRC_RATIO,
    hflip_prob: float = 0.5,
    randaugment: str | None = DEFAULT_RANDAUGMENT,
    interpolation: str = 'bicubic',
    reduced_decode: bool = True,
  ):
    if interpolation not in _RESAMPLE:
      raise ValueError(f'interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}')
    self.image_size = image_size
    self.scale = tuple(scale)
    self.ratio = tuple(ratio)
    self.hflip_prob = hflip_prob
    self.interpolation = interpolation
    self.reduced_decode = reduced_decode
    # timm passes the train interpolation to RandAugment's geometric ops as well.
    self.randaugment = (
      parse_randaugment(
        randaugment, interpolation=interpolation if interpolation != 'nearest' else 'bilinear'
      )
      if randaugment
      else None
    )

  def __call__(self, data: bytes, rng: np.random.Generator) -> np.ndarray:
    img, _ = decode_random_resized_crop(
      data,
      rng,
      self.image_size,
      scale=self.scale,
      ratio=self.ratio,
      interpolation=self.interpolation,
      reduced_decode=self.reduced_decode,
    )
    if rng.random() < self.hflip_prob:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if self.randaugment is not None:
      img = self.randaugment(img, rng)
    return np.asarray(img, dtype=np.uint8)


def eval_resize_size(image_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
  """Shorter-side resize target before the centre crop: int(image_size / crop_pct) (224 -> 256)."""
  if not 0 < crop_pct <= 1:
    raise ValueError(f'crop_pct must be in (0, 1], got {crop_pct}')
  return int(image_size / crop_pct)


def _eval_resize_crop(
  img: Image.Image,
  image_size: int,
  crop_pct: float,
  reduced_decode: bool,
  apply_exif_orientation: bool = False,
) -> Image.Image:
  """Resize shorter side (torchvision `Resize(int)` rounding) + centre crop, in one resample.

  Resampling only the centre-crop `box` of the original with the full-resize scale is the same
  computation as resizing everything and cropping afterwards (same sample positions and filter
  support), but it touches fewer pixels.
  """
  resize_short = eval_resize_size(image_size, crop_pct)
  if apply_exif_orientation:
    img = ImageOps.exif_transpose(img)
  width, height = img.size
  if width <= height:
    resized_w, resized_h = resize_short, int(resize_short * height / width)
  else:
    resized_w, resized_h = int(resize_short * width / height), resize_short
  draft = 1
  if reduced_decode:
    draft = _choose_draft_scale(
      width * image_size / resized_w, height * image_size / resized_h, image_size, image_size
    )
  img, actual = _load_rgb(img, draft)
  # torchvision CenterCrop offsets.
  top = round((resized_h - image_size) / 2.0)
  left = round((resized_w - image_size) / 2.0)
  sx, sy = width / resized_w / actual, height / resized_h / actual
  box = (left * sx, top * sy, (left + image_size) * sx, (top + image_size) * sy)
  return img.resize((image_size, image_size), resample=Image.Resampling.BICUBIC, box=box)


class EvalTransform:
  """Encoded bytes -> uint8 [size, size, 3]: bicubic resize to int(size/crop_pct), centre crop.

  `reduced_decode=False` (default) decodes at full resolution, exactly like the PyTorch reference
  eval; True allows JPEG DCT downscaling for large images (faster, very slightly different).
  """

  def __init__(
    self, image_size: int = 224, crop_pct: float = DEFAULT_CROP_PCT, *, reduced_decode: bool = False
  ):
    eval_resize_size(image_size, crop_pct)  # validates crop_pct
    self.image_size = image_size
    self.crop_pct = crop_pct
    self.reduced_decode = reduced_decode

  def __call__(self, data: bytes) -> np.ndarray:
    img = _eval_resize_crop(_open(data), self.image_size, self.crop_pct, self.reduced_decode)
    return np.asarray(img, dtype=np.uint8)


def eval_preprocess(
  image: Image.Image | np.ndarray | bytes,
  image_size: int = 224,
  crop_pct: float = DEFAULT_CROP_PCT,
  *,
  apply_exif_orientation: bool = True,
) -> np.ndarray:
  """Eval preprocessing for one image: resize shorter side to int(image_size / crop_pct)
  (bicubic), centre crop image_size x image_size.

  Args:
    image: encoded bytes (any PIL format), a PIL image (any mode) or a uint8 array
      [H, W], [H, W, 1], [H, W, 3] or [H, W, 4].
    image_size: output side (224).
    crop_pct: centre-crop fraction (0.875: 224 -> resize 256 -> crop 224).
    apply_exif_orientation: rotate camera photos upright from their EXIF tag (bytes / PIL input).
      The ImageNet eval pipeline does not do this (ImageNet is stored upright).

  Returns:
    uint8 [image_size, image_size, 3] RGB, not normalised (use `device_ops.normalize`).
  """
  img = _as_pil(image)
  return np.asarray(
    _eval_resize_crop(
      img, image_size, crop_pct, reduced_decode=False, apply_exif_orientation=apply_exif_orientation
    ),
    dtype=np.uint8,
  )


# ------------------------------------------------------------------------------------------------
# Class names.
# ------------------------------------------------------------------------------------------------


@functools.cache
def _class_name_table() -> tuple[tuple[str, str], ...]:
  text = (
    importlib.resources.files(__package__)
    .joinpath('imagenet_class_names.tsv')
    .read_text(encoding='utf-8')
  )
  rows = tuple(tuple(line.split('\t', 1)) for line in text.splitlines() if line.strip())
  if len(rows) != 1000 or any(len(row) != 2 for row in rows):
    raise RuntimeError(
      'imagenet_class_names.tsv is damaged: expected 1000 "synset<TAB>lemmas" '
      'lines; reinstall vcmamba_jax'
    )
  return rows  # type: ignore[return-value]


def imagenet_class_names(full: bool = False) -> list[str]:
  """The 1000 ImageNet-1k class names in label order (TFDS/torchvision order, by synset id).

  Args:
    full: False (default) returns the first lemma of each class ('tench', 'goldfish', ...);
      True returns the whole WordNet lemma string ('tench, Tinca tinca'). Note that two pairs of
      classes share their first lemma ('crane' 134/517, 'maillot' 638/639).
  """
  return [lemmas if full else lemmas.split(',')[0].strip() for _, lemmas in _class_name_table()]


def imagenet_synsets() -> list[str]:
  """The 1000 WordNet synset ids ('n01440764', ...) in label order."""
  return [synset for synset, _ in _class_name_table()]
