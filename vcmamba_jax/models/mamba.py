"""PlainMamba-style multi-directional Mamba mixer and layer (NHWC), as used by VCMamba.

``scan_mode='upstream'`` (default) reproduces the released models exactly, including two quirks
inherited from PlainMamba:
  1. only the SSM input u is permuted into each zig-zag order; delta, B and C stay in raster order
     (the direction bias is added to B by scan step);
  2. the dt_proj bias is applied twice (once by the Linear, once as the scan's delta bias).
``scan_mode='corrected'`` permutes delta/B/C with u and applies the bias once: a cleaner model for
new training runs, which cannot load the released weights.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.models.layers import (
  BatchNorm,
  DepthwiseConv,
  Dtype,
  Mlp,
  dense,
  drop_path,
  layer_norm,
  normal_init,
  torch_default_init,
)
from vcmamba_jax.models.options import SCAN_MODES, ComputeOptions, ScanMode

__all__ = ['SCAN_MODES', 'ComputeOptions', 'PlainMamba2D', 'PlainMambaLayer', 'ScanMode']
D_STATE = 16
EXPAND = 2
D_CONV = 7


def a_log_init(key, shape, dtype=jnp.float32):
  """S4D-real init: A_log[e, n] = log(n + 1)."""
  del key
  return jnp.broadcast_to(jnp.log(jnp.arange(1, shape[-1] + 1, dtype=dtype)), shape)


class PlainMamba2D(nn.Module):
  """The mixer: in_conv -> dw7x7+SiLU -> x_proj/dt_proj -> 4 zig-zag selective scans (summed)
  -> LayerNorm -> ReLU -> 1x1 conv -> BN. Input and output [B, H, W, C]."""

  d_state: int = D_STATE
  expand: int = EXPAND
  d_conv: int = D_CONV
  options: ComputeOptions = ComputeOptions()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    opts = self.options
    batch, height, width, features = x.shape
    inner = self.expand * features
    dt_rank = math.ceil(features / 16)
    n = self.d_state
    f32 = jnp.float32
    self.sow('intermediates', 'mixer_in', x)

    x = dense(
      inner,
      dtype=self.dtype,
      name='in_conv',
      kernel_init=torch_default_init(features),
      bias_init=torch_default_init(features),
    )(x)
    x = BatchNorm(dtype=self.dtype, name='in_norm')(x, train)
    x = DepthwiseConv(self.d_conv, impl=opts.depthwise_impl, dtype=self.dtype, name='conv2d')(
      x, train
    )
    x = jax.nn.silu(x)
    tokens = x.reshape(batch, height * width, inner)  # row-major token order

    x_dbl = dense(dt_rank + 2 * n, use_bias=False, dtype=self.dtype, name='x_proj')(tokens)
    dt_low, b_raster, c_raster = jnp.split(x_dbl, [dt_rank, dt_rank + n], axis=-1)
    dt_proj = dense(inner, dtype=self.dtype, name='dt_proj')
    delta = dt_proj(dt_low)
    a_log = self.param('A_log', a_log_init, (inner, n), f32)
    d_skip = self.param('D', nn.initializers.ones, (inner,), f32)
    direction_bias = self.param('direction_Bs', normal_init, (scan_lib.NUM_DIRECTION_CODES, n), f32)
    A = -jnp.exp(a_log)
    # Upstream passes the Linear's bias again as the scan's delta bias.
    delta_bias = dt_proj.variables['params']['bias'] if opts.scan_mode == 'upstream' else None

    orders, _, codes = scan_lib.scan_tables(height, width)
    # [B, 4, L, E]: token visited at each scan step (reversals/transposes, no gather).
    u = scan_lib.zigzag_sequences(x.reshape(batch, height, width, inner))
    dir_b = jnp.take(direction_bias, codes, axis=0)  # [4, L, N], indexed by scan step
    if opts.scan_mode == 'upstream':
      delta_k = delta[:, None]  # shared by the 4 scans, raster order
      b_k = b_raster[:, None].astype(f32) + dir_b
      c_k = c_raster[:, None]
    else:
      delta_k = jnp.take(delta, orders, axis=1)
      b_k = jnp.take(b_raster, orders, axis=1).astype(f32) + dir_b
      c_k = jnp.take(c_raster, orders, axis=1)
    self.sow('intermediates', 'scan_delta', delta)
    self.sow('intermediates', 'scan_u', u)
    self.sow('intermediates', 'scan_B', b_k)
    self.sow('intermediates', 'scan_C', c_raster)

    scan_fn = scan_lib.selective_scan_remat if opts.remat_scan else scan_lib.selective_scan
    y = scan_fn(u, delta_k, A, b_k, c_k, d_skip, delta_bias, impl=opts.scan_impl)
    self.sow('intermediates', 'scan_out', y)
    # Back to raster order and sum over directions: Y[p] = sum_k y[k, inverse[k, p]].
    y = scan_lib.zigzag_merge(y, height, width, materialize=not train)
    y = y.reshape(batch, height * width, inner)

    y = layer_norm(self.dtype, name='norm')(y)
    y = jax.nn.relu(y).reshape(batch, height, width, inner)
    y = dense(
      features,
      dtype=self.dtype,
      name='out_conv',
      kernel_init=torch_default_init(inner),
      bias_init=torch_default_init(inner),
    )(y)
    y = BatchNorm(dtype=self.dtype, name='out_norm')(y, train)
    self.sow('intermediates', 'mixer_out', y)
    return y


class PlainMambaLayer(nn.Module):
  """Pre-norm (BatchNorm) residual block: x + DP(mamba(BN(x))); x + DP(Mlp(BN(x)))."""

  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  options: ComputeOptions = ComputeOptions()
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, drop_noise: jax.Array | None = None) -> jax.Array:
    """``drop_noise``: [2, batch], the rows of the model's `DropPathNoise` for the two
    residual branches (mixer, Mlp)."""
    noise = (None, None) if drop_noise is None else (drop_noise[0], drop_noise[1])
    features = x.shape[-1]
    y = BatchNorm(dtype=self.dtype, name='norm')(x, train)
    y = PlainMamba2D(options=self.options, dtype=self.dtype, name='mamba')(y, train)
    x = x + drop_path(self.drop_path, y, train, noise[0])
    y = BatchNorm(dtype=self.dtype, name='norm2')(x, train)
    y = Mlp(
      int(features * self.mlp_ratio),
      depthwise_impl=self.options.depthwise_impl,
      dtype=self.dtype,
      name='mlp',
    )(y, train)
    return x + drop_path(self.drop_path, y, train, noise[1])
