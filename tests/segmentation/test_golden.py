"""The Semantic FPN port reproduces the authors' mmseg model (SEG_README.json, its bounds).

Eval: backbone features, FPN outputs, stride-4 logits, resized logits, the odd-size input, both
sliding-window cases (also through the fixed-canvas path) and the pos_embed quirk. Train: the loss
with mmseg's denominator, accuracy, logits, gradients and BatchNorm statistics after one step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.segmentation import golden_seg as G
from vcmamba_jax import segmentation as seg


@pytest.fixture(scope='module', autouse=True)
def highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def ref():
  G.require()
  return G.load(G.EVAL_NPZ)


@pytest.fixture(scope='module')
def inputs(ref):
  return {
    k: jnp.asarray(v.transpose(0, 2, 3, 1))
    for k, v in G.seg_weights().make_inputs(G.EVAL_NPZ).items()
  }


@pytest.fixture(scope='module')
def loaded(ref, tmp_path_factory):
  """(model, variables) through the public loader, from the materialised mmseg state_dict."""
  state = G.seg_weights().load_state_dict(G.EVAL_NPZ)
  path = tmp_path_factory.mktemp('seg') / 'sem_fpn_vcmamba_s_seed11.npz'
  np.savez(path, **state)
  import vcmamba_jax

  return vcmamba_jax.load_segmentation_weights(path, 'sem_fpn_vcmamba_s')


@pytest.fixture(scope='module')
def apply(loaded):
  model, variables = loaded
  fn = jax.jit(lambda x: model.apply(variables, x, train=False))
  return fn


def one_at_a_time(apply):
  """apply_fn for the sliding window: windows one by one, so every call reuses the compiled
  [1, 256, 256, 3] program of the whole-image tests."""
  return lambda x: jnp.concatenate([apply(x[i : i + 1])[0] for i in range(x.shape[0])])


def check_map(actual_full_nhwc, ref, key, classes_key, rows_key=None, cols_key=None, bound=1e-4):
  """Sampled max-abs and every per-class mean against the reference, bound * max|ref|."""
  r = ref
  sampled = G.sample(
    actual_full_nhwc,
    r[classes_key] if classes_key else None,
    r[rows_key] if rows_key else None,
    r[cols_key] if cols_key else None,
  )
  assert sampled.shape == r[key].shape, key
  tol = bound * np.abs(r[key]).max()
  assert np.abs(sampled - r[key]).max() <= tol, key
  means = np.asarray(actual_full_nhwc, np.float64).mean(axis=(0, 1, 2))
  assert np.abs(means - r[f'{key}_class_mean']).max() <= tol, f'{key} class means'


def test_model_loaded_with_mmseg_geometry(loaded):
  model, variables = loaded
  assert model.img_size == 256 and model.num_classes == 150
  assert variables['params']['backbone']['stage4']['pos_embed'].shape == (1, 8, 8, 288)
  assert 'norm' not in variables['params']['backbone'] and 'head' not in variables['params']


def test_features_fpn_logits(apply, inputs, ref):
  logits, out = apply(inputs['__input'])
  assert logits.shape == (1, 64, 64, 150) and logits.dtype == jnp.float32
  for i in range(4):
    feat = G.sample(out['features'][i], ref[f'__feat{i}_channels'])
    assert G.max_rel(feat, ref[f'__feat{i}']) <= 2e-5, f'feat{i}'
    fpn = G.sample(out['fpn'][i], ref[f'__fpn{i}_channels'])
    assert G.max_rel(fpn, ref[f'__fpn{i}']) <= 2e-5, f'fpn{i}'
  check_map(logits, ref, '__logits', None)


def test_resized_logits(apply, inputs, ref):
  full = seg.whole_inference(lambda x: apply(x)[0], inputs['__input'])
  assert full.shape == (1, 256, 256, 150)
  check_map(full, ref, '__resized', '__resized_classes', '__resized_rows', '__resized_cols')


def test_odd_size_input(apply, inputs, ref):
  x = inputs['__input_odd']
  logits, out = apply(x)
  assert logits.shape == (1, 60, 58, 150)
  assert G.max_rel(G.sample(out['features'][3]), ref['__odd_feat3']) <= 2e-5
  for i in (1, 2):
    fpn = G.sample(out['fpn'][i], ref['__odd_fpn_channels'])
    assert G.max_rel(fpn, ref[f'__odd_fpn{i}']) <= 2e-5, f'odd fpn{i}'
  check_map(logits, ref, '__odd_logits', '__odd_logits_classes')
  full = seg.whole_inference(lambda y: logits, x)
  check_map(
    full, ref, '__odd_resized', '__resized_classes', '__odd_resized_rows', '__odd_resized_cols'
  )


@pytest.mark.parametrize('case', ['__slide', '__slide2d'])
def test_slide_inference(apply, inputs, ref, case):
  crop, stride = tuple(ref[f'{case}_crop_size']), tuple(ref[f'{case}_stride'])
  images = inputs['__input_' + case[2:]]
  windows = seg.slide_windows(images.shape[1:3], crop, stride)
  np.testing.assert_array_equal(np.asarray(windows), ref[f'{case}_crops'])
  full = seg.slide_inference(one_at_a_time(apply), images, crop, stride, 150)
  assert full.shape == images.shape[:3] + (150,)
  check_map(full, ref, case, f'{case}_classes', f'{case}_rows', f'{case}_cols')


def test_slide_inference_on_a_fixed_canvas(apply, inputs, ref):
  """Both slide inputs padded onto one 320x448 canvas give the references (static shapes)."""
  a, b = inputs['__input_slide'], inputs['__input_slide2d']  # 256x416, 320x416
  canvas = jnp.zeros((2, 320, 448, 3)).at[0, :256, :416].set(a[0]).at[1, :320, :416].set(b[0])
  sizes = jnp.array([[256, 416], [320, 416]], jnp.int32)
  # At most 4 windows per image (the 320x416 one); the canvas grid would have 6.
  full = seg.slide_inference_padded(
    one_at_a_time(apply), canvas, sizes, 256, 171, 150, max_windows=4
  )
  check_map(full[:1, :256, :416], ref, '__slide', '__slide_classes', '__slide_rows', '__slide_cols')
  check_map(
    full[1:, :320, :416], ref, '__slide2d', '__slide2d_classes', '__slide2d_rows', '__slide2d_cols'
  )
  assert (
    float(jnp.abs(full[0, 256:]).max()) == 0.0 and float(jnp.abs(full[:, :, 416:]).max()) == 0.0
  )


def test_pos_embed_quirk_and_plain_resize(inputs, ref):
  pos_in = np.asarray(inputs['__posembed_in']).transpose(0, 3, 1, 2)  # back to NCHW
  quirk = seg.upstream_interpolate_pos_embed(pos_in, 16)
  assert G.max_rel(quirk, ref['__posembed_quirk']) <= 1e-6
  state = {'pos_embed': pos_in}
  plain = seg.backbone_state_from_classification(state, 512)['backbone.pos_embed']
  assert G.max_rel(plain, ref['__posembed_plain']) <= 1e-6
  upstream = seg.backbone_state_from_classification(state, 512, pos_embed_resize='upstream')
  np.testing.assert_array_equal(upstream['backbone.pos_embed'], quirk)


# ------------------------------------------------------------------------------------------------
# Train mode: one mmseg train_step (drop path and dropout off, as the golden).
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def train_ref():
  G.require()
  return G.load(G.TRAIN_NPZ)


@pytest.fixture(scope='module')
def train_step_outputs(train_ref):
  gen = G.seg_weights()
  state = gen.load_state_dict(G.TRAIN_NPZ)
  images = jnp.asarray(gen.make_inputs(G.TRAIN_NPZ)['__input'].transpose(0, 2, 3, 1))
  labels = jnp.asarray(train_ref['__labels'].astype(np.int32))
  model = seg.create_segmentation_model('sem_fpn_vcmamba_s', img_size=128, dropout_ratio=0.0)
  variables = seg.state_dict_to_variables(state, model)

  def loss_fn(params):
    (logits, _), updates = model.apply(
      {'params': params, 'batch_stats': variables['batch_stats']},
      images,
      train=True,
      mutable=['batch_stats'],
    )
    full = seg.resize(logits, labels.shape[1:3])
    loss = seg.cross_entropy(full, labels)
    return loss, (logits, updates['batch_stats'], seg.pixel_accuracy(full, labels))

  (loss, (logits, stats, acc)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
    variables['params']
  )
  return {
    'loss': float(loss),
    'acc': float(acc),
    'logits': np.asarray(logits),
    'grads': seg.to_mmseg_state_dict(grads),
    'stats': seg.to_mmseg_state_dict({'batch_stats': stats}, include_num_batches_tracked=False),
  }


def test_train_loss_and_logits(train_step_outputs, train_ref):
  out = train_step_outputs
  assert abs(out['loss'] - float(train_ref['__loss'])) <= 5e-6
  # mmseg's denominator counts ignored pixels: the non-ignored mean is far off.
  assert abs(out['loss'] - float(train_ref['__loss_avg_non_ignore_f64'])) > 0.5
  assert abs(out['acc'] - float(train_ref['__acc_seg'])) <= 1e-3
  sampled = G.sample(out['logits'], train_ref['__logits_classes'])
  assert np.abs(sampled - train_ref['__logits']).max() <= 1e-4
  means = out['logits'].astype(np.float64).mean(axis=(0, 1, 2))
  assert np.abs(means - train_ref['__logits_class_mean']).max() <= 1e-4


def test_train_gradients(train_step_outputs, train_ref):
  grads = train_step_outputs['grads']
  keys = [k[len('__grad::') :] for k in train_ref if k.startswith('__grad::')]
  assert len(keys) == 67
  for key in keys:
    want = train_ref[f'__grad::{key}']
    assert grads[key].shape == want.shape, key
    assert G.max_rel(grads[key], want) <= 2e-4, key
  zero_true = [
    'backbone.patch_embed.0.bias',
    'backbone.patch_embed.3.bias',
    'backbone.network.0.0.mlp.fc1.bias',
    'backbone.network.1.proj.bias',
    'backbone.network.6.4.norm.bias',
    'backbone.network.6.4.mamba.in_conv.0.bias',
    'backbone.network.6.4.mamba.out_conv.1.bias',
    'backbone.network.6.4.mlp.fc2.bias',
  ]
  for key in zero_true:
    assert np.abs(grads[key]).max() <= 1e-5, key


def test_train_batch_norm_statistics(train_step_outputs, train_ref):
  stats = train_step_outputs['stats']
  keys = [
    k[len('__bn_after::') :]
    for k in train_ref
    if k.startswith('__bn_after::') and not k.endswith('num_batches_tracked')
  ]
  assert len(keys) == 18
  for key in keys:
    assert G.max_rel(stats[key], train_ref[f'__bn_after::{key}']) <= 1e-5, key


def test_export_round_trips_to_the_mmseg_state_dict(loaded):
  _, variables = loaded
  state = G.seg_weights().load_state_dict(G.EVAL_NPZ)
  exported = seg.to_mmseg_state_dict(variables)
  assert sorted(exported) == sorted(state)
  for key, value in state.items():
    if key.endswith('num_batches_tracked'):
      continue
    assert exported[key].shape == value.shape, key
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
