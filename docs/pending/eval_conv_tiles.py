"""Times inference's fused Mlp conv (`depthwise_pallas.depthwise_bn_gelu`: 3x3 depthwise conv,
BatchNorm with running statistics and GELU in one kernel) at B's four stage shapes (batch 256,
bfloat16) for several tile settings, against the unfused ops (cuDNN's conv, then BatchNorm +
GELU as one XLA pass). One JSON line per shape, a time per setting (tile, warps, Triton's
software pipelining of the tile loop); run on the GPU machine.

  python3 docs/pending/eval_conv_tiles.py [--batch 256]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from vcmamba_jax.models import depthwise_pallas, ops
from vcmamba_jax.train.profiling import median_ms

# (tile_elements, max_pixels, num_warps, num_stages). Session 23 (H200) ran the first six with 4
# warps and no pipelining: 64x32 tiles were the fastest at 56x56x256, and slower than unfused.
SETTINGS = [
  (2048, 64, 4, 1),
  (2048, 64, 4, 2),
  (2048, 64, 4, 3),
  (2048, 64, 8, 3),
  (4096, 64, 8, 3),
  (1024, 64, 2, 3),
  (2048, 16, 4, 3),
]


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=256)
  args = parser.parse_args()
  for grid, channels in [(56, 256), (28, 512), (14, 1280), (7, 2048)]:
    keys = jax.random.split(jax.random.key(grid), 4)
    x = jax.random.normal(keys[0], (args.batch, grid, grid, channels), jnp.bfloat16)
    w = jax.random.normal(keys[1], (3, 3, 1, channels)) * 0.2
    b = jax.random.normal(keys[2], (channels,))
    affine = (b * 0.1, 1 + 0.1 * b, 0.1 * jax.random.normal(keys[3], (channels,)))
    unfused = jax.jit(lambda x, w, b, a=affine: ops.depthwise_conv_bn_gelu(x, w, b, a, impl='xla'))
    want = unfused(x, w, b)
    row = {'shape': [grid, grid, channels], 'unfused_ms': median_ms(unfused, x, w, b)}
    params = jnp.stack([b, *affine]).astype(jnp.float32)
    k = w.astype(x.dtype)[:, :, 0, :]
    for tile_elements, max_pixels, warps, stages in SETTINGS:
      launch = dict(
        tile_elements=tile_elements, max_pixels=max_pixels, num_warps=warps, num_stages=stages
      )
      fused = jax.jit(
        lambda x, k, p, launch=launch: depthwise_pallas.depthwise_bn_gelu(x, k, p, **launch)
      )
      got = fused(x, k, params)
      err = float(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32)).max())
      tiles = depthwise_pallas.eval_tiles(grid * grid, channels, tile_elements, max_pixels)
      name = f'fused_{tiles[0]}x{tiles[1]}_w{warps}_s{stages}'
      row[f'{name}_ms'] = median_ms(fused, x, k, params)
      row[f'{name}_maxerr'] = err
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
