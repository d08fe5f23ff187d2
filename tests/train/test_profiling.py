"""The profile tables' mapping from kernels to model scopes (no device needed)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcmamba_jax.train import profiling


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name='proj')(jnp.tanh(x)).sum()


def test_hlo_instructions_map_to_module_scopes():
  model = _Tiny()
  x = jnp.ones((2, 4))
  params = model.init(jax.random.key(0), x)
  compiled = jax.jit(jax.grad(lambda p: model.apply(p, x))).lower(params).compile()
  table = profiling.hlo_op_names(compiled.as_text())
  scopes = {profiling.scope_of(op_name) for _, op_name in table.values()}
  assert any(s.startswith('fwd proj') or s.startswith('bwd proj') for s in scopes), scopes
  assert all(opcode for opcode, _ in table.values())


def test_scope_of_reads_direction_and_primitive():
  name = 'jit(train_step)/transpose(jvp(VCMamba))/stage4/block3/mamba/conv2d/conv_general_dilated'
  assert profiling.scope_of(name) == 'bwd stage4/block3/mamba/conv2d [conv_general_dilated]'
  assert profiling.scope_of('jit(f)/jvp(VCMamba)/stem/conv1/add') == 'fwd stem/conv1 [add]'
  assert profiling.scope_of('') == '(no metadata)'


def test_categories_of_known_kernels():
  cat = profiling.categorize
  assert cat('void cudnn::cnn::conv2d_grouped_direct_kernel<...>', 'custom-call', 'x') == (
    'convolution'
  )
  assert cat('nvjet_sm90_tst_176x128_64x5_1x2_h_bz_TTN', 'custom-call', 'a/dot_general') == 'matmul'
  assert cat('_bwd_kernel', 'custom-call', 'a/pallas_call') == 'scan (pallas)'
  assert cat('_depthwise_bwd_kernel', 'custom-call', 'a/mid/pallas_call') == (
    'depthwise conv (pallas)'
  )
  assert cat('wrapped_scatter', 'scatter', 'a') == 'gather/scatter'
  assert cat('input_reduce_fusion_140', 'fusion', 'a') == 'reduction fusion'
  assert cat('loop_multiply_fusion_11', 'fusion', 'a') == 'elementwise fusion'
