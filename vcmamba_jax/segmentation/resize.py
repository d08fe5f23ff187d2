"""PyTorch-exact resizing of NHWC maps, as mmseg's ``resize`` (``F.interpolate``) computes it.

Two modes are used by the Semantic FPN and its inference, both size-based and without
antialiasing (``jax.image.resize`` differs from both, see SEG_README ``upstream_behaviour``):

* ``nearest``: PyTorch's LEGACY nearest: source index ``min(floor(dst * (in / out)), in - 1)``
  with the scale in float32. Equal to 2x repetition for even sizes, not for odd grids.
* ``bilinear`` (``align_corners=False``): source ``max((dst + 0.5) * (in / out) - 0.5, 0)``,
  neighbours ``floor`` and ``floor + 1`` (clamped), weights from the float32 fraction. Also used to
  DOWNsample (no antialiasing), as mmseg's FPNHead and slide inference do.

Index tables are computed on the host with numpy float32 arithmetic (the same rounding as
PyTorch's CPU kernels); ``bilinear_resize_dynamic`` computes them on the device from traced sizes
(for the fixed-canvas evaluation, where the real image size is data).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=256)
def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """int32 [out]: source index of every output position (PyTorch legacy 'nearest')."""
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.floor(dst * scale).astype(np.int64)
  return np.minimum(src, in_size - 1).astype(np.int32)


@functools.lru_cache(maxsize=256)
def bilinear_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(i0 int32 [out], i1 int32 [out], w1 float32 [out]) of PyTorch bilinear, align_corners=False;
  output = (1 - w1) * x[i0] + w1 * x[i1]."""
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
  i0 = src.astype(np.int32)  # truncation == floor for src >= 0
  i1 = np.minimum(i0 + 1, in_size - 1).astype(np.int32)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, w1


def _lerp(x: jax.Array, axis: int, i0, i1, w1) -> jax.Array:
  a = jnp.take(x, i0, axis=axis)
  b = jnp.take(x, i1, axis=axis)
  shape = [1] * x.ndim
  shape[axis] = -1
  w1 = jnp.reshape(w1, shape)
  return (a * (1 - w1) + b * w1).astype(x.dtype)


def resize(x: jax.Array, size: tuple[int, int], mode: str = 'bilinear') -> jax.Array:
  """Resizes NHWC ``x`` to ``size`` = (height, width) like ``F.interpolate(size=size, mode=mode,
  align_corners=False)`` on the NCHW layout. ``mode``: 'bilinear' or 'nearest' (legacy)."""
  height, width = x.shape[1], x.shape[2]
  out_h, out_w = int(size[0]), int(size[1])
  if mode == 'nearest':
    if out_h != height:
      x = jnp.take(x, nearest_indices(height, out_h), axis=1)
    if out_w != width:
      x = jnp.take(x, nearest_indices(width, out_w), axis=2)
    return x
  if mode != 'bilinear':
    raise ValueError(f"resize mode must be 'bilinear' or 'nearest', got {mode!r}")
  # PyTorch computes bilinear in one pass over both axes: out = sum of 4 weighted neighbours.
  # Separable application gives the same value up to float rounding (a few ulp).
  if out_h != height:
    x = _lerp(x, 1, *bilinear_table(height, out_h))
  if out_w != width:
    x = _lerp(x, 2, *bilinear_table(width, out_w))
  return x


def _dynamic_table(in_size: jax.Array, out_size: int, valid_out: jax.Array):
  """Device version of ``bilinear_table`` for a traced ``in_size`` and a traced real output
  size ``valid_out`` inside a static ``out_size`` canvas (positions beyond it are don't-care)."""
  f32 = jnp.float32
  scale = in_size.astype(f32) / jnp.maximum(valid_out, 1).astype(f32)
  dst = jnp.arange(out_size, dtype=f32)
  src = jnp.maximum(scale * (dst + f32(0.5)) - f32(0.5), f32(0))
  i0 = src.astype(jnp.int32)
  i0 = jnp.minimum(i0, jnp.maximum(in_size - 1, 0))
  i1 = jnp.minimum(i0 + 1, jnp.maximum(in_size - 1, 0))
  w1 = src - i0.astype(f32)
  return i0, i1, w1


def bilinear_resize_dynamic(
  x: jax.Array, in_size: jax.Array, out_size: jax.Array, canvas: tuple[int, int]
) -> jax.Array:
  """Bilinear (align_corners=False) resize of the top-left ``in_size`` region of one HWC map
  ``x`` to ``out_size``, written into a ``canvas``-sized HWC output (static shapes, traced sizes).

  Args:
    x: [H, W, C] with the real content in ``x[:in_size[0], :in_size[1]]``.
    in_size, out_size: int32 [2] (height, width), traced.
    canvas: static (height, width) of the output; values outside ``out_size`` are unspecified.
  """
  i0, i1, w1 = _dynamic_table(in_size[0], canvas[0], out_size[0])
  x = _lerp(x, 0, i0, i1, w1)
  i0, i1, w1 = _dynamic_table(in_size[1], canvas[1], out_size[1])
  return _lerp(x, 1, i0, i1, w1)
