"""Runs a script (e.g. scripts/benchmark.py) with the FFN blocks of each stage run by one
`nn.scan` (one compiled body per stage instead of one copy per block), to measure what it does
to compile time and step time on a GPU (issue 10). A prototype: the param tree is stacked
('ffn' with a leading block axis), and every block of a stage gets the stage's last drop-path
rate. SCAN_MAMBA=1 scans the Mamba layers too.

  python3 docs/pending/run_with_scanned_blocks.py scripts/benchmark.py <benchmark flags>
"""

import os
import runpy
import sys

import flax.linen as nn
import jax.numpy as jnp

from vcmamba_jax.models import layers, mamba, vcmamba


class _Body(nn.Module):
  drop_path: float
  options: object
  dtype: object
  kind: str

  @nn.compact
  def __call__(self, x, train):
    if self.kind == 'ffn':
      block = layers.FFNBlock(
        drop_path=self.drop_path,
        depthwise_impl=self.options.depthwise_impl,
        dtype=self.dtype,
        name='b',
      )
    else:
      block = mamba.PlainMambaLayer(
        drop_path=self.drop_path, options=self.options, dtype=self.dtype, name='b'
      )
    return block(x, train), None


def _run(stage, kind, n, x, train, name):
  scanned = nn.scan(
    _Body,
    variable_axes={'params': 0, 'batch_stats': 0},
    split_rngs={'params': True, 'drop_path': True},
    in_axes=nn.broadcast,
    length=n,
  )
  x, _ = scanned(stage.drop_path_rates[-1], stage.options, stage.dtype, kind, name=name)(x, train)
  return x


class ScanStage(vcmamba.Stage):
  @nn.compact
  def __call__(self, x, train):
    num_ffn = self.depth - self.num_mamba_layers
    x = _run(self, 'ffn', num_ffn, x, train, 'ffn')
    if self.num_mamba_layers:
      grid = self.pos_embed_grid
      pos_embed = self.param(
        'pos_embed', nn.initializers.normal(0.02), (1, grid, grid, x.shape[-1]), jnp.float32
      )
      x = (x + pos_embed).astype(self.dtype)
      if os.environ.get('SCAN_MAMBA'):
        x = _run(self, 'mamba', self.num_mamba_layers, x, train, 'mamba')
      else:
        for j in range(num_ffn, self.depth):
          x = mamba.PlainMambaLayer(
            drop_path=self.drop_path_rates[j],
            options=self.options,
            dtype=self.dtype,
            name=f'block{j}',
          )(x, train)
    return x


vcmamba.Stage = ScanStage
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name='__main__')
