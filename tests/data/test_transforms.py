"""Host transforms: RandomResizedCrop geometry, crop-aware decoding, eval resize, RandAugment."""

import io

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin

from vcmamba_jax import data as vd
from vcmamba_jax.data import transforms


def _smooth_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  coarse = rng.integers(0, 256, size=(max(2, height // 40), max(2, width // 40), 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))


def _jpeg(pixels: np.ndarray | Image.Image, quality: int = 95) -> bytes:
  img = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
  buffer = io.BytesIO()
  img.save(buffer, format='JPEG', quality=quality)
  return buffer.getvalue()


# --- RandomResizedCrop --------------------------------------------------------------------------


def test_random_resized_crop_boxes_are_in_bounds_with_area_and_ratio_in_range():
  rng = np.random.default_rng(0)
  areas, ratios = [], []
  for _ in range(3000):
    width, height = int(rng.integers(100, 800)), int(rng.integers(100, 800))
    top, left, crop_h, crop_w = vd.random_resized_crop_box(rng, width, height)
    assert top >= 0 and top + crop_h <= height and left >= 0 and left + crop_w <= width
    if 0.6 < width / height < 1.6:  # near-square images never need the fallback in practice
      areas.append(crop_h * crop_w / (width * height))
      ratios.append(crop_w / crop_h)
  areas, ratios = np.array(areas), np.array(ratios)
  # Bounds hold up to the rounding of w and h to whole pixels.
  assert areas.min() >= 0.08 * 0.95 and areas.max() <= 1.0
  assert ratios.min() >= 0.75 * 0.98 and ratios.max() <= 4 / 3 * 1.02
  # log-uniform aspect: median close to 1; area ~ U(0.08, 1) minus rejected draws (mean < 0.54).
  assert abs(np.median(np.log(ratios))) < 0.03
  assert 0.35 < areas.mean() < 0.54


@pytest.mark.parametrize(
  'width,height,expected',
  [
    (2000, 20, (0, 986, 20, 27)),  # too wide for any attempt: centre crop at ratio 4/3
    (20, 2000, (986, 0, 27, 20)),  # too tall: centre crop at ratio 3/4
  ],
)
def test_random_resized_crop_falls_back_to_clamped_centre_crop(width, height, expected):
  assert vd.random_resized_crop_box(np.random.default_rng(1), width, height) == expected


def test_draft_scale_only_downsamples():
  assert transforms._choose_draft_scale(1000, 950, 224, 224) == 4
  assert transforms._choose_draft_scale(500, 460, 224, 224) == 2
  assert transforms._choose_draft_scale(447, 900, 224, 224) == 1
  assert transforms._choose_draft_scale(2000, 1800, 224, 224) == 8


def test_reduced_jpeg_decode_matches_full_decode_and_keeps_crop_geometry(monkeypatch):
  data = _jpeg(_smooth_rgb(1600, 1200))
  requested = []
  original_draft = JpegImagePlugin.JpegImageFile.draft

  def spy(self, mode, size):
    requested.append(size)
    return original_draft(self, mode, size)

  monkeypatch.setattr(JpegImagePlugin.JpegImageFile, 'draft', spy)
  compared = 0
  for seed in range(40):
    fast, box = transforms.decode_random_resized_crop(data, np.random.default_rng(seed), 224)
    exact, box_exact = transforms.decode_random_resized_crop(
      data, np.random.default_rng(seed), 224, reduced_decode=False
    )
    assert box == box_exact and fast.size == exact.size == (224, 224)
    if transforms._choose_draft_scale(box[3], box[2], 224, 224) > 1:
      compared += 1
      diff = np.abs(np.asarray(fast, np.float32) - np.asarray(exact, np.float32))
      assert diff.mean() < 2.0, (seed, box, diff.mean())
  assert compared >= 10 and len(requested) == compared  # draft used exactly when it pays off


def test_train_transform_is_deterministic_per_generator_and_varies_across_seeds():
  data = _jpeg(_smooth_rgb(500, 375))
  transform = vd.TrainTransform(224)
  first = transform(data, np.random.default_rng(7))
  assert first.shape == (224, 224, 3) and first.dtype == np.uint8
  assert np.array_equal(first, transform(data, np.random.default_rng(7)))
  others = [transform(data, np.random.default_rng(s)) for s in range(8)]
  assert len({o.tobytes() for o in others}) == 8


def test_train_transform_on_grayscale_jpeg_gives_grey_rgb():
  grey = Image.fromarray(_smooth_rgb(300, 200)).convert('L')
  out = vd.TrainTransform(64, randaugment=None)(_jpeg(grey), np.random.default_rng(0))
  assert out.shape == (64, 64, 3)
  assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])


@pytest.mark.parametrize(
  'data',
  [
    _jpeg(_smooth_rgb(200, 150))[:700],  # truncated
    b'\xff\xd8\xff\xe0' + bytes(range(256)) * 2,  # JPEG signature, garbage body
    b'not an image at all',
  ],
)
def test_undecodable_bytes_raise_image_decode_error(data):
  with pytest.raises(vd.ImageDecodeError):
    vd.TrainTransform(64)(data, np.random.default_rng(0))
  with pytest.raises(vd.ImageDecodeError):
    vd.EvalTransform(64)(data)


# --- Eval preprocessing -------------------------------------------------------------------------


def test_eval_preprocess_500x375_resizes_to_256_then_centre_crops_224():
  pixels = _smooth_rgb(500, 375, seed=3)
  out = vd.eval_preprocess(pixels)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  assert vd.eval_resize_size(224, 0.875) == 256
  # Reference: torchvision Resize(256) (short side 256, long side int(256 * 500 / 375) = 341)
  # then CenterCrop(224) at round((341 - 224) / 2) = 58, round((256 - 224) / 2) = 16.
  resized = np.asarray(Image.fromarray(pixels).resize((341, 256), Image.Resampling.BICUBIC))
  reference = resized[16:240, 58:282]
  assert np.abs(out.astype(int) - reference.astype(int)).max() <= 1


def test_eval_transform_on_jpeg_bytes_matches_eval_preprocess():
  data = _jpeg(_smooth_rgb(375, 500, seed=4))
  assert np.array_equal(vd.EvalTransform(224)(data), vd.eval_preprocess(data))
  fast = vd.EvalTransform(224, reduced_decode=True)(_jpeg(_smooth_rgb(1200, 1000, seed=5)))
  exact = vd.EvalTransform(224)(_jpeg(_smooth_rgb(1200, 1000, seed=5)))
  assert np.abs(fast.astype(float) - exact.astype(float)).mean() < 2.0


def test_eval_preprocess_converts_any_mode_to_rgb():
  rgba = np.zeros((60, 80, 4), np.uint8)
  rgba[...] = (10, 200, 30, 0)  # fully transparent: alpha is dropped, colour kept
  assert np.all(vd.eval_preprocess(rgba, 32) == (10, 200, 30))
  grey = vd.eval_preprocess(np.full((50, 40), 77, np.uint8), 32)
  assert grey.shape == (32, 32, 3) and np.all(grey == 77)
  assert np.all(vd.eval_preprocess(np.full((50, 40, 1), 9, np.uint8), 32) == 9)
  cmyk = Image.new('CMYK', (40, 40), (255, 0, 0, 0))  # pure cyan
  assert np.all(vd.eval_preprocess(cmyk, 16) == (0, 255, 255))
  deep = Image.fromarray(np.full((40, 40), 65535, np.uint16))  # 16-bit grey: white, not clipped
  assert np.all(vd.eval_preprocess(deep, 16) == 255)
  palette = Image.new('P', (40, 40), 3)
  palette.putpalette([0, 0, 0] * 3 + [1, 2, 3] + [0, 0, 0] * 252)
  assert np.all(vd.eval_preprocess(palette, 16) == (1, 2, 3))


def test_eval_preprocess_rejects_float_and_odd_channel_arrays():
  with pytest.raises(TypeError, match='uint8'):
    vd.eval_preprocess(np.zeros((40, 40, 3), np.float32))
  with pytest.raises(ValueError, match='shape'):
    vd.eval_preprocess(np.zeros((40, 40, 2), np.uint8))


# --- RandAugment --------------------------------------------------------------------------------


def _ra(magnitude: float, std: float = 0.0, prob: float = 1.0) -> transforms.RandAugment:
  return transforms.RandAugment(magnitude=magnitude, magnitude_std=std, prob=prob)


def _gradient(width: int = 100, height: int = 80) -> Image.Image:
  x = np.linspace(0, 255, width)[None, :, None]
  y = np.linspace(0, 255, height)[:, None, None]
  return Image.fromarray(np.broadcast_to((x + y) / 2, (height, width, 3)).astype(np.uint8))


def test_parse_randaugment_recipe_string():
  ra = vd.parse_randaugment('rand-m9-mstd0.5-inc1')
  assert (ra.num_layers, ra.magnitude, ra.magnitude_std, ra.prob) == (2, 9.0, 0.5, 0.5)
  assert ra.ops == transforms.RAND_INCREASING_OPS and len(ra.ops) == 15
  assert ra.fill == (124, 116, 104) and ra.hparams['translate_pct'] == 0.45
  assert vd.parse_randaugment('rand-n3-m5').ops == transforms.RAND_OPS
  with pytest.raises(ValueError, match='unsupported'):
    vd.parse_randaugment('rand-m9-w0')
  with pytest.raises(ValueError, match="start with 'rand'"):
    vd.parse_randaugment('augmix-m5')


def test_pixel_ops_follow_timm_levels():
  img = _gradient()
  x = np.asarray(img).astype(int)
  rng = np.random.default_rng(0)
  assert np.array_equal(np.asarray(_ra(9).apply_op(img, 'Invert', rng)), 255 - x)
  # PosterizeIncreasing: bits = 4 - int(m / 10 * 4): m9 -> 1 bit, m10 -> 0 bits (black).
  assert set(np.unique(_ra(9).apply_op(img, 'PosterizeIncreasing', rng))) == {0, 128}
  assert np.asarray(_ra(10).apply_op(img, 'PosterizeIncreasing', rng)).max() == 0
  # SolarizeIncreasing: threshold 256 - int(m / 10 * 256); m5 -> 128.
  solarized = np.asarray(_ra(5).apply_op(img, 'SolarizeIncreasing', rng)).astype(int)
  assert np.array_equal(solarized, np.where(x >= 128, 255 - x, x))
  # SolarizeAdd: + int(m / 10 * 110) below 128; m5 -> +55.
  added = np.asarray(_ra(5).apply_op(img, 'SolarizeAdd', rng)).astype(int)
  assert np.array_equal(added, np.where(x < 128, np.minimum(x + 55, 255), x))
  # Increasing enhancers: factor 1 -+ m / 10 * 0.9; m0 is the identity.
  assert np.array_equal(np.asarray(_ra(0).apply_op(img, 'BrightnessIncreasing', rng)), x)
  bright = np.asarray(_ra(10).apply_op(img, 'BrightnessIncreasing', rng)).astype(float)
  ok_dark = np.abs(bright - x * 0.1).max() <= 1
  ok_bright = np.abs(bright - np.minimum(x * 1.9, 255)).max() <= 1
  assert ok_dark or ok_bright
  low_contrast = Image.fromarray((x // 2 + 50).astype(np.uint8))
  stretched = np.asarray(_ra(9).apply_op(low_contrast, 'AutoContrast', rng))
  assert (stretched.min(), stretched.max()) == (0, 255)


def test_translate_rel_shifts_by_45_percent_and_fills_with_mean_pixel():
  img = _gradient(100, 80)
  x = np.asarray(img)
  signs = set()
  for seed in range(12):
    out = np.asarray(_ra(10).apply_op(img, 'TranslateXRel', np.random.default_rng(seed)))
    if np.array_equal(out[:, :55], x[:, 45:]):  # content moved left by 45 px
      signs.add(+1)
      assert np.all(out[:, 55:] == (124, 116, 104))
    else:
      assert np.array_equal(out[:, 45:], x[:, :55])  # or right by 45 px
      assert np.all(out[:, :45] == (124, 116, 104))
      signs.add(-1)
  assert signs == {+1, -1}


def test_rotate_and_shear_fill_corners_with_mean_pixel():
  img = Image.fromarray(np.full((64, 64, 3), 255, np.uint8))
  # Rotating by 30 degrees uncovers all four corners; shearing by 0.3 (about the origin, the
  # top-left corner) uncovers exactly one of the corners opposite to it.
  for name, filled_corners in (('Rotate', 4), ('ShearX', 1), ('ShearY', 1)):
    out = np.asarray(_ra(10).apply_op(img, name, np.random.default_rng(3)))
    corners = [out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]]
    assert sum(np.array_equal(c, (124, 116, 104)) for c in corners) == filled_corners, name
    assert np.array_equal(out[0, 0], (255, 255, 255)) or name == 'Rotate'
    assert np.array_equal(out[32, 32], (255, 255, 255)), name


def test_magnitude_noise_is_gaussian_std_half_clipped_at_10():
  # SolarizeAdd adds int(m / 10 * 110) to a black image, which exposes the drawn magnitude.
  black = Image.new('RGB', (4, 4))
  ra = _ra(9, std=0.5)
  rng = np.random.default_rng(0)
  adds = np.array(
    [np.asarray(ra.apply_op(black, 'SolarizeAdd', rng))[0, 0, 0] for _ in range(4000)], float
  )
  assert 97.5 < adds.mean() < 99.5  # E[int(11 m)], m ~ N(9, 0.5): ~98.5
  assert 4.5 < adds.std() < 6.3  # 11 * 0.5 = 5.5, a little less after clipping
  assert adds.max() == 110  # clipped at magnitude 10 ...
  assert 0.01 < np.mean(adds == 110) < 0.04  # ... which N(9, 0.5) exceeds 2.3% of the time


def test_each_op_is_applied_with_probability_half():
  img = _gradient()
  ra = transforms.RandAugment(prob=0.5)
  rng = np.random.default_rng(0)
  applied = [
    not np.array_equal(np.asarray(ra.apply_op(img, 'Invert', rng)), np.asarray(img))
    for _ in range(2000)
  ]
  assert 0.46 < np.mean(applied) < 0.54


def test_two_ops_drawn_uniformly_with_replacement(monkeypatch):
  ra = vd.parse_randaugment('rand-m9-mstd0.5-inc1')
  calls = []
  monkeypatch.setattr(ra, 'apply_op', lambda img, name, rng: calls.append(name) or img)
  rng = np.random.default_rng(0)
  for _ in range(3000):
    ra(None, rng)
  assert len(calls) == 6000
  freq = np.array([calls.count(name) for name in ra.ops]) / len(calls)
  assert np.all(np.abs(freq - 1 / 15) < 0.015)
  same = np.mean([calls[i] == calls[i + 1] for i in range(0, 6000, 2)])
  assert 0.04 < same < 0.095  # with replacement: 1/15 of the pairs repeat an op


def test_every_increasing_op_runs_on_rgb_and_keeps_size():
  img = Image.fromarray(_smooth_rgb(96, 64))
  ra = _ra(9, std=0.5)
  for name in transforms.RAND_INCREASING_OPS + transforms.RAND_OPS:
    out = ra.apply_op(img, name, np.random.default_rng(1))
    assert out.size == (96, 64) and out.mode == 'RGB', name


def test_class_names_have_no_blank_entries():
  assert all(name and not name.isspace() for name in vd.imagenet_class_names())
  assert len(set(vd.imagenet_class_names())) == 998  # "crane", "maillot" repeat
