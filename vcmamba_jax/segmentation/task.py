"""The segmentation task for the shared trainer: what differs from classification (model, data,
loss, optimizer, evaluation, pretrained weights), behind the small interface the trainer calls.
The loop, sharding, checkpoints, resume, preemption, NaN handling and metric writing are the
trainer's, unchanged.

Train step (mmseg EncoderDecoder.forward_train): normalise, zero the Pad region (mmseg pads
after Normalize), forward with batch-statistics BN over the global batch (SyncBN), stride-4
logits resized to the crop, CE with ignore 255 averaged over all pixels. Eval: mmseg's slide
inference (crop/stride of config.eval) on a fixed canvas (one compiled program), logits resized
to each image's original size, argmax, and the per-class areas of intersect_and_union
(reduce_zero_label), summed exactly in int64 on the host over the whole split (every record
once across processes); mIoU/mAcc/aAcc/per-class IoU as mmseg.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from ml_collections import ConfigDict

from vcmamba_jax import data as data_lib
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.models import vcmamba as vcmamba_lib
from vcmamba_jax.segmentation import ade20k, metrics, pipeline, transforms
from vcmamba_jax.segmentation import convert as convert_lib
from vcmamba_jax.segmentation import model as model_lib
from vcmamba_jax.segmentation.inference import slide_inference_padded
from vcmamba_jax.segmentation.resize import bilinear_resize_dynamic, resize
from vcmamba_jax.train import builders

TRAIN_KEYS = ('image', 'label', 'size', 'num_skipped')
EVAL_KEYS = ('image', 'label', 'size', 'orig_size', 'mask', 'num_skipped')


# ------------------------------------------------------------------------------------------------
# Model and data.
# ------------------------------------------------------------------------------------------------
def build_model(config: ConfigDict) -> model_lib.SemanticFPN:
  # The backbone's options are the classifier's (train.builders.model_kwargs), plus the head's.
  return model_lib.create_segmentation_model(
    config.model.name,
    dropout_ratio=config.model.dropout_ratio,
    **builders.model_kwargs(config),
  )


def check_data(config: ConfigDict) -> None:
  if config.model.num_classes != ade20k.NUM_CLASSES:
    raise ValueError(
      f'config.model.num_classes={config.model.num_classes} but ADE20K has '
      f'{ade20k.NUM_CLASSES} classes; pass --config.model.num_classes={ade20k.NUM_CLASSES}.'
    )


def train_source(config: ConfigDict):
  return ade20k.get_ade20k_source(config.data.train_split, config.data.data_dir)


def steps_per_epoch(config: ConfigDict, num_train_records: int) -> int:
  return data_lib.train_steps_per_epoch(num_train_records, config.global_batch_size, 1)


def train_transform(config: ConfigDict) -> transforms.SegTrainTransform:
  d = config.data
  return transforms.SegTrainTransform(
    crop_size=config.model.img_size,
    scale=tuple(d.scale),
    ratio_range=tuple(d.ratio_range),
    cat_max_ratio=d.cat_max_ratio,
    flip_prob=d.hflip_prob,
    photometric=d.photometric,
  )


def eval_transform(config: ConfigDict) -> transforms.SegEvalTransform:
  return transforms.SegEvalTransform(
    image_canvas=tuple(config.eval.image_canvas),
    label_canvas=tuple(config.eval.label_canvas),
    scale=tuple(config.data.scale),
    size_divisor=config.eval.size_divisor,
  )


def make_train_dataset(config: ConfigDict, source):
  d = config.data
  return pipeline.create_seg_train_dataset(
    source=source,
    global_batch_size=config.global_batch_size,
    transform=train_transform(config),
    seed=config.seed,
    num_workers=d.num_workers,
    num_threads=d.num_threads,
    prefetch_batches=d.prefetch_batches,
  )


def make_eval_dataset(config: ConfigDict):
  d = config.data
  return pipeline.create_seg_eval_dataset(
    source=ade20k.get_ade20k_source(d.eval_split, d.data_dir),
    global_batch_size=config.eval_batch_size,
    transform=eval_transform(config),
    num_workers=d.num_workers,
    num_threads=d.num_threads,
  )


# ------------------------------------------------------------------------------------------------
# Optimizer: AdamW, poly decay, no weight-decay exemptions (mmseg's optimizer config).
# ------------------------------------------------------------------------------------------------
def poly_schedule(config: ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """mmcv PolyLrUpdaterHook (by iteration): (lr - min_lr) * (1 - it / max_iters)^power + min_lr."""
  peak, power, min_lr = config.optimizer.base_lr, config.schedule.power, config.schedule.min_lr
  total = config.num_train_steps

  def schedule(count):
    progress = jnp.minimum(jnp.asarray(count, jnp.float32) / total, 1.0)
    return (peak - min_lr) * (1.0 - progress) ** power + min_lr

  return schedule


def build_optimizer(config: ConfigDict, steps_per_epoch: int):
  del steps_per_epoch  # iteration-based
  o = config.optimizer
  schedule = poly_schedule(config)
  tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return schedule, tx


# ------------------------------------------------------------------------------------------------
# Steps.
# ------------------------------------------------------------------------------------------------
def _valid_mask(sizes: jax.Array, shape: tuple[int, int]) -> jax.Array:
  rows = jnp.arange(shape[0])[None, :, None] < sizes[:, 0, None, None]
  cols = jnp.arange(shape[1])[None, None, :] < sizes[:, 1, None, None]
  return rows & cols  # [B, H, W]


def make_loss_fn(model: nn.Module, config: ConfigDict):
  """``loss_fn(params, batch_stats, batch, rng) -> (loss, (batch_stats, metrics))`` for the
  trainer's step (see ``vcmamba_jax.train.steps.make_train_step``)."""

  def loss_fn(params, batch_stats, batch, rng):
    drop_path_rng, dropout_rng = jax.random.split(rng)
    images = data_lib.normalize(batch['image'], jnp.dtype(config.model.dtype))
    mask = _valid_mask(batch['size'], images.shape[1:3])
    images = jnp.where(mask[..., None], images, 0)
    (logits, _), updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'drop_path': drop_path_rng, 'dropout': dropout_rng},
    )
    labels = batch['label'].astype(jnp.int32)
    full = resize(logits.astype(jnp.float32), labels.shape[1:3])
    loss = metrics.cross_entropy(full, labels)
    return loss, (updates['batch_stats'], {'acc_seg': metrics.pixel_accuracy(full, labels)})

  return loss_fn


def make_eval_step(model: nn.Module, config: ConfigDict):
  """``eval_step(weights, batch) -> {name: int32 [4, K] areas of this batch}``."""
  e = config.eval
  num_classes = config.model.num_classes
  label_canvas = tuple(e.label_canvas)

  def eval_step(weights: Mapping[str, Any], batch: Mapping[str, jax.Array]):
    images = data_lib.normalize(batch['image'], jnp.dtype(config.model.dtype))
    out = {}
    for name, variables in weights.items():

      def apply_fn(x, variables=variables):
        return model.apply(variables, x, train=False)[0]

      logits = slide_inference_padded(
        apply_fn, images, batch['size'], e.crop, e.stride, num_classes, e.max_windows
      )
      resized = jax.vmap(lambda x, s, o: bilinear_resize_dynamic(x, s, o, label_canvas))(
        logits, batch['size'], batch['orig_size']
      )
      pred = jnp.argmax(resized, axis=-1)
      mask = _valid_mask(batch['orig_size'], label_canvas) & batch['mask'][:, None, None]
      out[name] = metrics.device_areas(
        pred, batch['label'], num_classes, reduce_zero_label=True, mask=mask
      )
    out['num_examples'] = jnp.sum(batch['mask'], dtype=jnp.int32)
    out['skipped_records'] = jnp.sum(batch['num_skipped'], dtype=jnp.int32)
    return out

  return eval_step


def jit_eval_step(model: nn.Module, config: ConfigDict, mesh, weight_shardings):
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(
    sharding_lib.traced_under_mesh(make_eval_step(model, config), mesh),
    in_shardings=(weight_shardings, sharding_lib.batch_sharding(mesh)),
    out_shardings=replicated,
  )


def eval_source(config: ConfigDict):
  return ade20k.get_ade20k_source(config.data.eval_split, config.data.data_dir)


def run_evaluation(
  eval_step, weights, dataset, mesh, num_batches: int | None = None, announce_compile: bool = True
) -> dict[str, Any]:
  """One exact pass: int64 host sums of the per-batch areas -> mIoU, mAcc, aAcc, per-class IoU
  (``<prefix>mIoU``, ... per weight set; EMA weights get 'ema_')."""
  totals: dict[str, np.ndarray] = {}
  counts = {'num_examples': 0, 'skipped_records': 0}
  iterator = iter(dataset)
  done = 0
  try:
    for batch in iterator:
      batch = sharding_lib.make_global_batch(mesh, {k: batch[k] for k in EVAL_KEYS})
      if done == 0 and announce_compile:
        logging.info('Compiling the eval step (the first eval batch)...')
      done += 1
      if done % 100 == 0:
        logging.info('eval: %d/%s batches', done, num_batches or '?')
      result = jax.device_get(eval_step(weights, batch))
      for key, value in result.items():
        if key in counts:
          counts[key] += int(value)
        else:
          totals[key] = totals.get(key, 0) + np.asarray(value, np.int64)
  finally:
    iterator.close()
  out: dict[str, Any] = dict(counts)
  for name, areas in totals.items():
    prefix = f'{name}_' if name else ''
    m = metrics.areas_to_metrics(areas)
    out.update({f'{prefix}mIoU': m['mIoU'], f'{prefix}mAcc': m['mAcc'], f'{prefix}aAcc': m['aAcc']})
    out.update(
      {f'{prefix}IoU/{c}': float(v) for c, v in zip(ade20k.CLASS_NAMES, m['IoU'], strict=True)}
    )
  return out


# ------------------------------------------------------------------------------------------------
# Pretrained weights: a classification backbone (ImageNet), or a whole Semantic FPN.
# ------------------------------------------------------------------------------------------------
def backbone_from_classification(
  variables: Mapping[str, Any], img_size: int, pos_embed_resize: str = 'bicubic'
) -> dict[str, Any]:
  """Classification variables (our Flax layout) -> the ``backbone`` subtrees of a Semantic FPN at
  ``img_size``: norm/head/dist_head dropped, pos_embed resized (see
  ``convert.backbone_state_from_classification``)."""
  grid = model_lib.pos_embed_grid(img_size)
  out = {}
  for collection in ('params', 'batch_stats'):
    tree = {
      k: v for k, v in dict(variables[collection]).items() if k not in ('norm', 'head', 'dist_head')
    }
    flat = traverse_util.flatten_dict(jax.device_get(tree))
    key = ('stage4', 'pos_embed')
    if key in flat and flat[key].shape[1] != grid:
      nhwc = np.asarray(flat[key], np.float32)
      if pos_embed_resize == 'upstream':
        torch_layout = convert_lib.upstream_interpolate_pos_embed(nhwc.transpose(0, 3, 1, 2), grid)
        flat[key] = torch_layout.transpose(0, 2, 3, 1)
      else:
        flat[key] = np.asarray(vcmamba_lib.resize_pos_embed(jnp.asarray(nhwc), (grid, grid)))
    out[collection] = traverse_util.unflatten_dict(flat)
  return out


def fit_pretrained(
  fresh: Mapping[str, Any], read_classification: Callable[[], Mapping[str, Any]], config
) -> dict[str, Any]:
  """``fresh`` Semantic-FPN variables with the backbone from a classification source (strict:
  every backbone variable must be replaced, with its shape)."""
  backbone = backbone_from_classification(
    read_classification(), config.model.img_size, config.model.pos_embed_resize
  )
  out = {}
  for collection in ('params', 'batch_stats'):
    want = traverse_util.flatten_dict(fresh[collection]['backbone'])
    got = traverse_util.flatten_dict(backbone[collection])
    bad = sorted(
      '/'.join(k)
      for k in set(want) ^ set(got)
      | {k for k in set(want) & set(got) if want[k].shape != got[k].shape}
    )
    if bad:
      raise convert_lib.CheckpointError(
        f'init_from does not fit the backbone of {config.model.name} ({len(bad)} variables '
        f'differ, e.g. {bad[:5]}): is it a checkpoint of '
        f'{model_lib.SEG_MODELS[config.model.name]}?'
      )
    tree = dict(fresh[collection])
    tree['backbone'] = backbone[collection]
    out[collection] = tree
  logging.info(
    'Backbone initialised from classification weights (pos_embed: %s).',
    config.model.pos_embed_resize,
  )
  return out


@dataclasses.dataclass(frozen=True)
class Source:
  """What ``load_weights`` read (the trainer logs ``description`` and records ``step``)."""

  description: str
  step: int | None = None


def _is_segmentation_tree(params: Mapping[str, Any]) -> bool:
  return 'backbone' in params and 'decode_head' in params


def load_weights(
  path: str,
  model: model_lib.SemanticFPN,
  config: ConfigDict,
  *,
  with_ema: bool = False,
  reinit_heads: bool = False,
  fresh: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], str]:
  """Weights for ``init_from`` / ``eval_from``: a Semantic FPN (one of our segmentation runs, or
  an mmseg state_dict with backbone.*/neck.*/decode_head.*) is loaded whole and strictly; a
  classification source (the authors' ImageNet .pth, our classification run or exported model)
  initialises the backbone only, the neck and head keeping ``fresh`` (the new model's init).

  Returns:
    ({'': variables, 'ema': ... (our runs with an EMA, with_ema)}, a description for logs).
  """
  from vcmamba_jax import checkpoint as checkpoint_lib
  from vcmamba_jax import convert

  del reinit_heads  # the head of a classifier is never used
  found = checkpoint_lib.find_training_checkpoint(path)
  if found is not None:
    tree = checkpoint_lib.read_training_weights(path)
    variables = {'params': tree['params'], 'batch_stats': tree['batch_stats']}
    if _is_segmentation_tree(variables['params']):
      sets = {'': variables}
      if with_ema and tree.get('ema'):
        sets['ema'] = tree['ema']
      return sets, Source(f'checkpoint {found[0]}/{found[1]}', found[1])
    read = lambda: variables
  elif os.path.isfile(path) and any(
    k.startswith('backbone.') for k in convert.read_state_dict(path)
  ):
    state = convert.read_state_dict(path)
    if 'decode_head.conv_seg.weight' in state:  # a whole Semantic FPN
      return {'': convert_lib.state_dict_to_variables(state, model, source=path)}, Source(path)
    read = lambda: convert_lib.state_dict_to_variables(
      {**convert_lib.to_mmseg_state_dict(fresh), **_backbone_only(state)}, model, source=path
    )
    return {'': read()}, Source(f'backbone of {path}')
  else:
    backbone_name = model_lib.SEG_MODELS[config.model.name]
    read = lambda: convert.load_pretrained(path, backbone_name)[1]
  if fresh is None:
    raise ValueError('initialising the backbone alone needs the fresh model variables')
  return {'': fit_pretrained(jax.device_get(fresh), read, config)}, Source(f'backbone from {path}')


def _backbone_only(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v for k, v in state.items() if k.startswith('backbone.')}


def format_eval(results: Mapping[str, Any]) -> str:
  keys = [k for k in results if k.split('/')[-1] in ('mIoU', 'mAcc', 'aAcc', 'ema_mIoU')]
  return ', '.join(f'{k.split("/")[-1]} {100 * results[k]:.2f}' for k in keys)
