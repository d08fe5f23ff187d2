"""Model family: structure, any input size, train mode, options and input validation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vcmamba_jax
from vcmamba_jax.models import grid_size, layers, resize_pos_embed, weight_decay_mask
from vcmamba_jax.models.vcmamba import _torch_bicubic_matrix


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize(
  'name,expected', [('vcmamba_s', 10_478_720), ('vcmamba_m', 21_072_176), ('vcmamba_b', 31_450_832)]
)
def test_parameter_counts_match_the_paper(name, expected):
  model = vcmamba_jax.create_model(name)
  shapes = jax.eval_shape(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 224, 224, 3)))
  )
  assert _count(shapes['params']) == expected
  assert shapes['params']['stage4']['pos_embed'].shape == (1, 7, 7, model.widths[-1])


@pytest.fixture(scope='module')
def nano():
  model = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64)
  variables = jax.jit(
    lambda: model.init({'params': jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)))
  )()
  return model, variables


def _apply(model, variables, x, **kwargs):
  return jax.jit(lambda v, x: model.apply(v, x, **kwargs))(variables, x)


def test_outputs_and_feature_shapes(nano):
  model, variables = nano
  x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  logits, out = _apply(model, variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert out['stem'].shape == (2, 16, 16, 16)
  assert out['stage1'].shape == (2, 16, 16, 16)
  assert out['stage2'].shape == (2, 8, 8, 32)
  assert out['stage3'].shape == (2, 4, 4, 48)
  assert out['stage4'].shape == (2, 2, 2, 64)
  assert out['pre_logits'].shape == (2, 64)
  np.testing.assert_allclose(logits, (out['logits_head'] + out['logits_dist']) / 2, rtol=1e-6)


@pytest.mark.parametrize('height,width', [(64, 64), (96, 64), (57, 130)])
def test_any_input_size_runs(nano, height, width):
  model, variables = nano
  x = jax.random.normal(jax.random.key(2), (1, height, width, 3))
  logits, out = _apply(model, variables, x)
  assert out['stage4'].shape[1:3] == (grid_size(height), grid_size(width))
  assert np.isfinite(np.asarray(logits)).all()


def test_matching_grid_does_not_resize(nano):
  model, variables = nano
  pos = variables['params']['stage4']['pos_embed']
  assert resize_pos_embed(pos, (2, 2)) is pos
  # 33..64 px all give a 2x2 grid: same pos_embed path, no resize.
  assert grid_size(33) == grid_size(64) == 2 and grid_size(65) == 3


def test_bicubic_resize_matches_pytorch_weights():
  # Rows of torch's bicubic (a=-0.75, align_corners=False) kernel sum to one and upsampling by 2
  # has the cubic-convolution weights at fractional offset 0.75 at interior points.
  m = _torch_bicubic_matrix(7, 14)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-12)
  np.testing.assert_allclose(m[4, :4], [-0.03515625, 0.26171875, 0.87890625, -0.10546875])
  pos = jax.random.normal(jax.random.key(0), (1, 7, 7, 3))
  constant = jnp.ones((1, 7, 7, 3))
  np.testing.assert_allclose(resize_pos_embed(constant, (10, 4)), 1.0, rtol=1e-6)
  assert resize_pos_embed(pos, (16, 16)).shape == (1, 16, 16, 3)


def test_torch_resize_agrees_when_torch_is_available():
  torch = pytest.importorskip('torch')
  pos = np.random.default_rng(0).normal(size=(1, 7, 7, 5)).astype(np.float32)
  ours = np.asarray(resize_pos_embed(jnp.asarray(pos), (16, 11)))
  ref = torch.nn.functional.interpolate(
    torch.from_numpy(pos.transpose(0, 3, 1, 2)), size=(16, 11), mode='bicubic', align_corners=False
  )
  np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)


def test_train_mode_updates_batch_stats_and_drop_path(nano):
  model = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64, drop_path_rate=0.5)
  _, variables = nano
  x = jax.random.normal(jax.random.key(3), (4, 64, 64, 3))

  @jax.jit
  def run(key):
    return model.apply(variables, x, train=True, mutable=['batch_stats'], rngs={'drop_path': key})

  (logits_a, _), state = run(jax.random.key(0))
  (logits_b, _), _ = run(jax.random.key(1))
  assert not np.allclose(logits_a, logits_b)  # stochastic depth draws differ
  old = variables['batch_stats']['stem']['bn1']['mean']
  new = state['batch_stats']['stem']['bn1']['mean']
  assert not np.allclose(old, new)
  with pytest.raises(Exception, match='drop_path'):
    model.apply(variables, x, train=True, mutable=['batch_stats'])


def test_corrected_scan_mode_differs_and_loads_same_tree(nano):
  model, variables = nano
  corrected = vcmamba_jax.create_model(
    'vcmamba_nano', num_classes=10, img_size=64, scan_mode='corrected'
  )
  # At init the SSM state term is tiny next to the D skip; give x_proj (B, C, dt) real weight.
  params = jax.tree_util.tree_map_with_path(
    lambda path, p: p * 50 if 'x_proj' in jax.tree_util.keystr(path) else p, variables['params']
  )
  variables = {**variables, 'params': params}
  x = jax.random.normal(jax.random.key(4), (2, 96, 96, 3))
  a, _ = _apply(model, variables, x)
  b, _ = _apply(corrected, variables, x)
  assert np.abs(a - b).max() > 1e-3


def test_sequential_scan_impl_matches_associative(nano):
  model, variables = nano
  seq = vcmamba_jax.create_model(
    'vcmamba_nano', num_classes=10, img_size=64, scan_impl='sequential'
  )
  x = jax.random.normal(jax.random.key(5), (2, 96, 96, 3))
  np.testing.assert_allclose(
    _apply(model, variables, x)[0], _apply(seq, variables, x)[0], rtol=1e-4, atol=1e-5
  )


def test_scanned_blocks_keep_the_tree_and_compute_the_same(nano):
  # nano's stage 3 has two FFN blocks: with scan_blocks they run as one nn.scan over a stacked
  # view of block0/block1, stored under the same names as unrolled.
  model, variables = nano
  scanned = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64, scan_blocks=True)
  shapes = jax.eval_shape(
    lambda: scanned.init({'params': jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)))
  )
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)
  x = jax.random.normal(jax.random.key(6), (2, 64, 64, 3))
  np.testing.assert_allclose(
    _apply(scanned, variables, x)[0], _apply(model, variables, x)[0], rtol=1e-6, atol=1e-7
  )

  def loss_and_stats(m, params):
    # With stochastic depth: both forms take their blocks' rows of the same DropPathNoise draw.
    (logits, _), state = m.clone(drop_path_rate=0.5).apply(
      {**variables, 'params': params},
      x,
      train=True,
      mutable=['batch_stats'],
      rngs={'drop_path': jax.random.key(4)},
    )
    return jnp.sum(logits**2), state['batch_stats']

  def run(m):
    return jax.jit(jax.value_and_grad(lambda p: loss_and_stats(m, p), has_aux=True))(
      variables['params']
    )

  (loss, stats), grads = run(model)
  (loss_s, stats_s), grads_s = run(scanned)
  np.testing.assert_allclose(loss_s, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(stats_s), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Relative to each leaf's scale (the biases in front of a BatchNorm get ~1e-11 noise).
  for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + 1e-9)
  assert float(np.abs(grads['stage3']['block1']['mlp']['fc1']['kernel']).max()) > 0


@pytest.mark.parametrize('remat_mlp, fewer_per_block', [('fc2_input', 1), ('all', 2)])
def test_remat_mlp_recomputes_the_gelu_outputs_and_computes_the_same(
  nano, remat_mlp, fewer_per_block
):
  model, variables = nano
  plain = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64, remat_mlp='none')
  remat = vcmamba_jax.create_model('vcmamba_nano', num_classes=10, img_size=64, remat_mlp=remat_mlp)
  x = jax.random.normal(jax.random.key(7), (2, 64, 64, 3))

  def loss_and_stats(m, params):
    (logits, _), state = m.apply(
      {**variables, 'params': params}, x, train=True, mutable=['batch_stats']
    )
    return jnp.sum(logits**2), state['batch_stats']

  def residuals_and_grads(m):
    # The VJP closure's leaves are the residuals the backward pass keeps.
    loss, vjp, stats = jax.vjp(lambda p: loss_and_stats(m, p), variables['params'], has_aux=True)
    return jax.tree.leaves(vjp), loss, stats, vjp(jnp.ones_like(loss))[0]

  def hidden_residuals(leaves):
    # The Mlp's hidden tensors: [2, grid, grid, 4 * width] per stage of nano (16, 32, 48, 64).
    hidden = {(2, 64 // 2**s, 64 // 2**s, 4 * w) for s, w in zip((2, 3, 4, 5), (16, 32, 48, 64))}
    return sum(leaf.shape in hidden for leaf in leaves)

  kept, loss, stats, grads = jax.jit(lambda: residuals_and_grads(plain))()
  kept_r, loss_r, stats_r, grads_r = jax.jit(lambda: residuals_and_grads(remat))()
  # One or two GELU outputs fewer for each of nano's five FFN blocks.
  assert hidden_residuals(kept) - hidden_residuals(kept_r) == fewer_per_block * 5
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(stats_r), jax.tree.leaves(stats)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # Relative to each leaf's scale, floored at the tree's (the biases in front of a BatchNorm have
  # gradients that are zero up to rounding).
  floor = 1e-6 * max(float(np.abs(b).max()) for b in jax.tree.leaves(grads))
  for a, b in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()) + floor)
  assert model.remat_mlp == 'fc2_input'  # the default


def test_stochastic_depth_with_an_array_rate_drops_whole_samples():
  # Under nn.scan each block's drop-path rate is an array (nn.Dropout needs a Python float).
  x = jnp.ones((2000, 2, 2, 3), jnp.bfloat16)
  depth = layers.StochasticDepth()
  y = depth.apply({}, x, jnp.float32(0.25), True, rngs={'drop_path': jax.random.key(0)})
  y = np.asarray(y, np.float32).reshape(2000, -1)
  kept = y[:, 0] != 0
  # nn.Dropout's scaling: x / 0.75 in x's dtype (bf16: 1.3359375).
  np.testing.assert_array_equal(y[kept], np.float32(x[0, 0, 0, 0] / 0.75))
  assert np.all(y[~kept] == 0)
  assert 0.22 < 1 - kept.mean() < 0.28
  assert depth.apply({}, x, jnp.float32(0.25), False) is x
  y0 = depth.apply({}, x, jnp.float32(0.0), True, rngs={'drop_path': jax.random.key(1)})
  np.testing.assert_array_equal(y0, x)


def test_drop_path_noise_keeps_samples_below_one_minus_rate():
  x = jnp.ones((4, 2, 2, 3), jnp.bfloat16)
  noise = jnp.array([0.1, 0.74, 0.76, 0.99])
  for rate in (0.25, jnp.float32(0.25)):  # a field's float, a scanned block's array
    y = np.asarray(layers.drop_path(rate, x, True, noise), np.float32)
    expected = np.float32(x[0, 0, 0, 0] / 0.75) * np.array([1, 1, 0, 0], np.float32)
    np.testing.assert_array_equal(y[:, 0, 0, 0], expected)
    assert layers.drop_path(rate, x, False, noise) is x
  assert layers.drop_path(0.0, x, True, noise) is x


def test_drop_path_noise_gives_every_site_its_own_row(nano):
  # nano's last stage: 1 FFN block, then 2 Mamba layers (mixer and Mlp each): 5 sites. Raising
  # one row of the noise above 1 - rate drops that site's branch (for one sample; the others
  # see it through the batch statistics): every row changes the output, so with as many rows as
  # sites, each site reads its own.
  _, variables = nano
  stage = vcmamba_jax.models.vcmamba.Stage(
    depth=3, num_mamba_layers=2, drop_path_rates=(0.5, 0.5, 0.5), pos_embed_grid=2
  )
  stage_vars = {k: v['stage4'] for k, v in variables.items()}
  x = jax.random.normal(jax.random.key(5), (2, 2, 2, 64))

  @jax.jit
  def run(noise):
    return stage.apply(stage_vars, x, True, noise, mutable=['batch_stats'])[0]

  keep_all = run(jnp.zeros((5, 2)))
  for site in range(5):
    y = run(jnp.zeros((5, 2)).at[site, 1].set(0.99))
    # (the FFN block's branch is small: its layer_scale starts at 1e-5)
    assert float(jnp.max(jnp.abs(y[1] - keep_all[1]))) > 1e-5, site


def test_weight_decay_mask_follows_upstream(nano):
  _, variables = nano
  mask = weight_decay_mask(variables['params'])
  block = mask['stage4']['block2']
  assert mask['stage4']['pos_embed'] is True
  assert mask['stage1']['block0']['layer_scale'] is True
  assert block['mamba']['A_log'] is True and block['mamba']['direction_Bs'] is True
  assert block['mamba']['D'] is False
  assert block['mamba']['x_proj']['kernel'] is True
  assert block['mamba']['dt_proj']['bias'] is False
  assert block['norm']['scale'] is False and block['mamba']['norm']['scale'] is False
  assert mask['stem']['conv1']['kernel'] is True and mask['stem']['conv1']['bias'] is False
  assert mask['head']['kernel'] is True and mask['head']['bias'] is False


def test_initialisation_follows_upstream(nano):
  _, variables = nano
  p = variables['params']
  np.testing.assert_allclose(p['stage1']['block0']['layer_scale'], 1e-5)
  mamba = p['stage4']['block1']['mamba']
  np.testing.assert_allclose(mamba['A_log'][3], np.log(np.arange(1, 17)), rtol=1e-6)
  np.testing.assert_allclose(mamba['D'], 1.0)
  np.testing.assert_allclose(mamba['dt_proj']['bias'], 0.0)
  assert 0.015 < float(jnp.std(p['head']['kernel'])) < 0.025
  bound = 1 / 3  # PyTorch default init of the depthwise 3x3 `mid` conv (fan_in 9)
  mid = p['stage2']['block0']['mlp']['mid']['kernel']
  assert float(jnp.abs(mid).max()) <= bound and float(jnp.abs(mid).max()) > 0.9 * bound
  stats = variables['batch_stats']['stage2']['block0']['mlp']['norm1']
  np.testing.assert_allclose(stats['mean'], 0.0)
  np.testing.assert_allclose(stats['var'], 1.0)


@pytest.mark.parametrize(
  'shape,dtype,match',
  [
    ((2, 64, 64), jnp.float32, 'NHWC'),
    ((2, 3, 64, 64), jnp.float32, 'NCHW'),
    ((2, 64, 64, 1), jnp.float32, '3 channels'),
    ((2, 64, 64, 3), jnp.uint8, 'normalised'),
    ((2, 16, 16, 3), jnp.float32, 'at least 32x32'),
  ],
)
def test_bad_inputs_are_clear_errors(nano, shape, dtype, match):
  model, variables = nano
  with pytest.raises((ValueError, TypeError), match=match):
    model.apply(variables, jnp.zeros(shape, dtype))


def test_unknown_model_and_option_errors():
  with pytest.raises(ValueError, match="unknown model 'vcmamba_xl'.*vcmamba_b"):
    vcmamba_jax.create_model('vcmamba_xl')
  with pytest.raises(TypeError, match='unknown model options.*colour'):
    vcmamba_jax.create_model('vcmamba_s', colour='red')
  # Option values are checked when the model is built, not at its first call.
  with pytest.raises(ValueError, match="scan_mode must be one of .*'upstream'.*got 'sideways'"):
    vcmamba_jax.create_model('vcmamba_nano', scan_mode='sideways')
  with pytest.raises(ValueError, match="depthwise_impl must be one of .*'taps'"):
    vcmamba_jax.create_model('vcmamba_nano', depthwise_impl='fft')
  with pytest.raises(ValueError, match="scan_blocks must be True or False, got 'yes'"):
    vcmamba_jax.create_model('vcmamba_nano', scan_blocks='yes')
  with pytest.raises(ValueError, match="remat_mlp must be one of .*'fc2_input'.*got True"):
    vcmamba_jax.create_model('vcmamba_nano', remat_mlp=True)
  with pytest.raises(ValueError, match='scan_impl must be one of'):
    vcmamba_jax.create_segmentation_model('sem_fpn_vcmamba_nano', scan_impl='magic')
