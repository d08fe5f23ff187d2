"""Jittable on-device batch ops: normalisation, random erasing, mixup/cutmix, label smoothing.

They run inside the jitted train step on the (possibly batch-sharded) global batch; they are pure
`jnp` code, so under GSPMD the batch flip of mixup/cutmix and the per-example masks shard like
any other op. Order in the DeiT recipe: `normalize` -> `random_erasing` -> `mixup_cutmix`.
All images are NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def normalize(
  images: jax.Array,
  dtype: jnp.dtype = jnp.float32,
  mean: Sequence[float] = IMAGENET_MEAN,
  std: Sequence[float] = IMAGENET_STD,
) -> jax.Array:
  """uint8 [..., H, W, 3] in 0..255 -> (x / 255 - mean) / std as `dtype` (computed in float32)."""
  scale = jnp.asarray([1.0 / (255.0 * s) for s in std], jnp.float32)
  offset = jnp.asarray([m / s for m, s in zip(mean, std, strict=True)], jnp.float32)
  return (images.astype(jnp.float32) * scale - offset).astype(dtype)


def one_hot_smoothed(
  labels: jax.Array, num_classes: int, smoothing: float = 0.0, dtype: jnp.dtype = jnp.float32
) -> jax.Array:
  """int [B] -> [B, num_classes]: off = smoothing / K, on = 1 - smoothing + off (rows sum to 1)."""
  off = smoothing / num_classes
  on = 1.0 - smoothing + off
  return jax.nn.one_hot(labels, num_classes, dtype=dtype) * (on - off) + jnp.asarray(off, dtype)


def random_erasing(
  rng: jax.Array,
  images: jax.Array,
  *,
  prob: float = 0.25,
  min_area: float = 0.02,
  max_area: float = 1.0 / 3.0,
  min_aspect: float = 0.3,
  max_aspect: float | None = None,
  mode: str = 'pixel',
  max_attempts: int = 10,
) -> jax.Array:
  """timm `RandomErasing` (one box per image), per example and vectorised over the batch.

  For each image, with probability `prob`: up to `max_attempts` candidate boxes with area fraction
  ~ U(min_area, max_area) and aspect ratio log-uniform in [min_aspect, max_aspect]
  (h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect))); the first with h < H and w < W
  is erased at a uniform offset. Fill: 'pixel' per-pixel N(0, 1), 'rand' per-channel N(0, 1),
  'const' zeros (images are already normalised, so N(0, 1) is "random pixel values").

  Args:
    rng: PRNG key.
    images: normalised float [B, H, W, C].

  Returns:
    [B, H, W, C], same dtype.
  """
  if mode not in ('pixel', 'rand', 'const'):
    raise ValueError(f"mode must be 'pixel', 'rand' or 'const', got {mode!r}")
  max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
  batch, height, width, channels = images.shape
  keys = jax.random.split(rng, 6)
  apply = jax.random.uniform(keys[0], (batch,)) < prob
  area = jax.random.uniform(keys[1], (batch, max_attempts), minval=min_area, maxval=max_area)
  area = area * (height * width)
  aspect = jnp.exp(
    jax.random.uniform(
      keys[2], (batch, max_attempts), minval=math.log(min_aspect), maxval=math.log(max_aspect)
    )
  )
  box_h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  box_w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (box_h < height) & (box_w < width)
  first = jnp.argmax(fits, axis=1)  # first fitting attempt (0 if none fits: then `apply` is off)
  box_h = jnp.take_along_axis(box_h, first[:, None], axis=1)[:, 0]
  box_w = jnp.take_along_axis(box_w, first[:, None], axis=1)[:, 0]
  apply = apply & jnp.any(fits, axis=1)
  top = jax.random.randint(keys[3], (batch,), 0, jnp.maximum(height - box_h + 1, 1))
  left = jax.random.randint(keys[4], (batch,), 0, jnp.maximum(width - box_w + 1, 1))
  rows = jnp.arange(height)[None, :, None]
  cols = jnp.arange(width)[None, None, :]
  inside = (
    (rows >= top[:, None, None])
    & (rows < (top + box_h)[:, None, None])
    & (cols >= left[:, None, None])
    & (cols < (left + box_w)[:, None, None])
  )
  erase = inside & apply[:, None, None]
  if mode == 'pixel':
    fill = jax.random.normal(keys[5], images.shape, images.dtype)
  elif mode == 'rand':
    fill = jax.random.normal(keys[5], (batch, 1, 1, channels), images.dtype)
  else:
    fill = jnp.zeros((), images.dtype)
  return jnp.where(erase[..., None], fill, images)


def symmetric_betas(rng: jax.Array, alphas: list[float]) -> jax.Array:
  """One Beta(a, a) draw per a in ``alphas`` [n], as g0 / (g0 + g1) of Gamma(a) draws taken in
  log space (`jax.random.beta`'s method) but from one `loggamma` call: its rejection sampler is
  a while loop, one loop over all 2n draws instead of 2n loops (`mixup_cutmix` for B's batch,
  compiled for an H100 deviceless: 28 -> 17 kernels, 4.6 -> 4.1 s)."""
  log_gammas = jax.random.loggamma(rng, jnp.repeat(jnp.asarray(alphas, jnp.float32), 2))
  return jax.nn.softmax(log_gammas.reshape(len(alphas), 2), axis=-1)[:, 0]


def mixup_cutmix(
  rng: jax.Array,
  images: jax.Array,
  labels: jax.Array,
  *,
  num_classes: int,
  mixup_alpha: float = 0.8,
  cutmix_alpha: float = 1.0,
  switch_prob: float = 0.5,
  prob: float = 1.0,
  label_smoothing: float = 0.1,
  correct_lam: bool = True,
) -> tuple[jax.Array, jax.Array]:
  """timm `Mixup` in 'batch' mode: one lambda for the batch, partner = the batch flipped.

  With probability `prob` the batch is mixed: CutMix with probability `switch_prob` (when both
  alphas > 0), else MixUp; lambda ~ Beta(alpha, alpha). CutMix pastes the flipped batch into one
  box of side sqrt(1 - lambda) * (H, W) centred at a uniform pixel and clipped to the image; with
  `correct_lam` lambda becomes 1 - (clipped box area) / (H * W). Targets are
  lambda * smooth(y) + (1 - lambda) * smooth(flip(y)) with `one_hot_smoothed`.

  Args:
    rng: PRNG key.
    images: float [B, H, W, C] (normalised).
    labels: int [B].

  Returns:
    (mixed images [B, H, W, C] same dtype, soft targets float32 [B, num_classes], rows sum to 1).
  """
  targets = one_hot_smoothed(labels, num_classes, label_smoothing)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  _, height, width, _ = images.shape
  keys = jax.random.split(rng, 6)
  mixing = jax.random.uniform(keys[0]) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(keys[1]) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  alphas = [a for a in (mixup_alpha, cutmix_alpha) if a > 0]
  lams = iter(symmetric_betas(keys[2], alphas))
  lam_mixup = next(lams) if mixup_alpha > 0 else 1.0
  lam_cutmix = next(lams) if cutmix_alpha > 0 else 1.0
  lam = jnp.where(mixing, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
  cutting = mixing & use_cutmix

  # CutMix box (timm `rand_bbox`): int(H * sqrt(1 - lam)), centre uniform, halves clipped.
  ratio = jnp.sqrt(1.0 - lam)
  cut_h = jnp.floor(height * ratio).astype(jnp.int32)
  cut_w = jnp.floor(width * ratio).astype(jnp.int32)
  centre_y = jax.random.randint(keys[4], (), 0, height)
  centre_x = jax.random.randint(keys[5], (), 0, width)
  y_lo = jnp.clip(centre_y - cut_h // 2, 0, height)
  y_hi = jnp.clip(centre_y + cut_h // 2, 0, height)
  x_lo = jnp.clip(centre_x - cut_w // 2, 0, width)
  x_hi = jnp.clip(centre_x + cut_w // 2, 0, width)
  if correct_lam:
    box_area = ((y_hi - y_lo) * (x_hi - x_lo)).astype(jnp.float32)
    lam_box = 1.0 - box_area / (height * width)
  else:
    lam_box = lam
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  in_box = (rows >= y_lo) & (rows < y_hi) & (cols >= x_lo) & (cols < x_hi)

  # One blend for both: weight of the original image per pixel ({0, 1} for CutMix, lam for MixUp).
  weight = jnp.where(cutting, jnp.where(in_box, 0.0, 1.0), lam).astype(images.dtype)
  weight = weight[None, :, :, None]
  mixed = images * weight + images[::-1] * (1 - weight)
  lam_final = jnp.where(cutting, lam_box, lam)
  targets = targets * lam_final + targets[::-1] * (1.0 - lam_final)
  return mixed, targets
