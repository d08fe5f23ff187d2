"""Whole-image and sliding-window inference, as mmseg's ``EncoderDecoder`` computes them.

``apply_fn(images) -> stride-4 logits`` (NHWC) is any function of a batch of normalised NHWC
images, e.g. ``lambda x: model.apply(variables, x, train=False)[0]``. Every function returns
logits (before softmax/argmax) at the input size, float32 NHWC.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from vcmamba_jax.segmentation.resize import resize

ApplyFn = Callable[[jax.Array], jax.Array]


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
  if isinstance(value, int):
    value = (value, value)
  value = tuple(int(v) for v in value)
  if len(value) != 2 or min(value) <= 0:
    raise ValueError(f'{what} must be a positive int or (height, width), got {value}')
  return value


def _logits(apply_fn: ApplyFn, images: jax.Array) -> jax.Array:
  out = apply_fn(images)
  if isinstance(out, tuple):  # model.apply returns (logits, out)
    out = out[0]
  return out


def whole_inference(apply_fn: ApplyFn, images: jax.Array) -> jax.Array:
  """mmseg ``encode_decode``: stride-4 logits resized (bilinear, align_corners=False) to the
  input size. images [B, H, W, 3] -> float32 [B, H, W, num_classes]."""
  logits = _logits(apply_fn, images)
  return resize(logits.astype(jnp.float32), images.shape[1:3], mode='bilinear')


def slide_windows(
  image_size: tuple[int, int], crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
  """(y1, y2, x1, x2) of mmseg's sliding windows over an image of ``image_size``: a grid of
  ``max(size - crop + stride - 1, 0) // stride + 1`` windows per axis, the last ones shifted back
  inside the image (windows are smaller than ``crop`` only where the image is)."""
  (h_img, w_img), (h_crop, w_crop), (h_stride, w_stride) = (
    image_size,
    _pair(crop, 'crop'),
    _pair(stride, 'stride'),
  )
  h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
  windows = []
  for h_idx in range(h_grids):
    for w_idx in range(w_grids):
      y1, x1 = h_idx * h_stride, w_idx * w_stride
      y2, x2 = min(y1 + h_crop, h_img), min(x1 + w_crop, w_img)
      windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
  return windows


def slide_inference(
  apply_fn: ApplyFn,
  images: jax.Array,
  crop: int | Sequence[int],
  stride: int | Sequence[int],
  num_classes: int,
) -> jax.Array:
  """mmseg ``slide_inference(rescale=False)``: every window goes through ``apply_fn`` (the windows
  of the batch in one call), its logits are resized to the window and summed into place; the
  sum is divided by the number of windows covering each pixel.

  Args:
    apply_fn: normalised images [N, h, w, 3] -> stride-4 logits [N, h', w', num_classes].
    images: [B, H, W, 3] normalised (static shape: one compile per image size; see
      ``slide_inference_padded`` for a fixed canvas).
    crop, stride: window size and step, int or (height, width) (mmseg ADE20K: 512, 341).
    num_classes: logit channels.

  Returns:
    float32 [B, H, W, num_classes].
  """
  batch, h_img, w_img, _ = images.shape
  windows = slide_windows((h_img, w_img), crop, stride)
  crops = jnp.concatenate([images[:, y1:y2, x1:x2] for y1, y2, x1, x2 in windows], axis=0)
  window_logits = whole_inference(apply_fn, crops)
  if window_logits.shape[-1] != num_classes:
    raise ValueError(f'apply_fn gives {window_logits.shape[-1]} classes, expected {num_classes}')
  preds = jnp.zeros((batch, h_img, w_img, num_classes), jnp.float32)
  count = jnp.zeros((1, h_img, w_img, 1), jnp.float32)
  for i, (y1, y2, x1, x2) in enumerate(windows):
    preds = preds.at[:, y1:y2, x1:x2].add(window_logits[i * batch : (i + 1) * batch])
    count = count.at[:, y1:y2, x1:x2].add(1.0)
  return preds / count


def max_windows_of(canvas: tuple[int, int], crop, stride) -> tuple[int, int]:
  """Number of window rows and columns of the largest image that fits ``canvas``."""
  (h, w), (hc, wc), (hs, ws) = canvas, _pair(crop, 'crop'), _pair(stride, 'stride')
  return max(h - hc + hs - 1, 0) // hs + 1, max(w - wc + ws - 1, 0) // ws + 1


def slide_inference_padded(
  apply_fn: ApplyFn,
  images: jax.Array,
  sizes: jax.Array,
  crop: int | Sequence[int],
  stride: int | Sequence[int],
  num_classes: int,
  max_windows: int | None = None,
) -> jax.Array:
  """``slide_inference`` of images of different sizes padded onto one static canvas.

  The same windows and numbers as ``slide_inference`` on each image cropped to its size, with
  one compiled program for every size: window k of an image is (k // cols, k % cols) of its own
  grid, computed from the traced size; windows beyond its grid are masked (and cost compute:
  choose ``max_windows`` as the most windows any image has, e.g. 6 for ADE20K's test transform
  at crop 512 / stride 341, instead of the canvas grid).

  Images smaller than ``crop`` in a dimension are an approximation here: their window covers
  the canvas padding there (mmseg runs the model on the smaller image); mmseg's ADE20K test
  transform gives a 512 short side except for aspect ratios above 4.

  Args:
    images: [B, Hc, Wc, 3] normalised, the real image in the top-left ``sizes[b]`` corner.
    sizes: int32 [B, 2] real (height, width).
    max_windows: windows computed per image (default: every window of the canvas).

  Returns:
    float32 [B, Hc, Wc, num_classes]; zeros outside each image.
  """
  batch, hc, wc, channels = images.shape
  (h_crop, w_crop), (h_stride, w_stride) = _pair(crop, 'crop'), _pair(stride, 'stride')
  if hc < h_crop or wc < w_crop:
    raise ValueError(f'canvas {hc}x{wc} is smaller than the crop {h_crop}x{w_crop}')
  rows, cols = max_windows_of((hc, wc), (h_crop, w_crop), (h_stride, w_stride))
  n = max_windows or rows * cols
  sizes = jnp.asarray(sizes, jnp.int32)
  h_img = jnp.maximum(sizes[:, 0], h_crop)
  w_img = jnp.maximum(sizes[:, 1], w_crop)
  h_grids = jnp.maximum(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
  w_grids = jnp.maximum(w_img - w_crop + w_stride - 1, 0) // w_stride + 1

  # Window offsets [B, n] and validity, in slide_windows' order (row-major over each image's grid).
  k = jnp.arange(n)[None]
  h_idx, w_idx = k // w_grids[:, None], k % w_grids[:, None]
  y2 = jnp.minimum(h_idx * h_stride + h_crop, h_img[:, None])
  x2 = jnp.minimum(w_idx * w_stride + w_crop, w_img[:, None])
  y1 = jnp.maximum(y2 - h_crop, 0)
  x1 = jnp.maximum(x2 - w_crop, 0)
  valid = k < (h_grids * w_grids)[:, None]

  def take(image, y, x):
    return jax.lax.dynamic_slice(image, (y, x, 0), (h_crop, w_crop, channels))

  crops = jax.vmap(jax.vmap(take, in_axes=(None, 0, 0)))(images, y1, x1)  # [B, n, hc, wc, 3]
  window_logits = whole_inference(apply_fn, crops.reshape(batch * n, h_crop, w_crop, channels))
  window_logits = window_logits.reshape(batch, n, h_crop, w_crop, num_classes)
  window_logits = jnp.where(valid[:, :, None, None, None], window_logits, 0.0)
  ones = jnp.broadcast_to(
    valid[:, :, None, None, None].astype(jnp.float32), (batch, n, h_crop, w_crop, 1)
  )

  def place(canvas, patches, ys, xs):
    def body(i, acc):
      window = jax.lax.dynamic_slice(acc, (ys[i], xs[i], 0), patches.shape[1:])
      return jax.lax.dynamic_update_slice(acc, window + patches[i], (ys[i], xs[i], 0))

    return jax.lax.fori_loop(0, n, body, canvas)

  zeros = jnp.zeros((batch, hc, wc, num_classes), jnp.float32)
  preds = jax.vmap(place)(zeros, window_logits, y1, x1)
  count = jax.vmap(place)(jnp.zeros((batch, hc, wc, 1), jnp.float32), ones, y1, x1)
  return jnp.where(count > 0, preds / jnp.maximum(count, 1.0), 0.0)
