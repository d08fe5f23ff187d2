"""Builders shared by training, evaluation, the benchmark and every other program that runs the
model of a config (ahead-of-time compilation, dense tasks): config -> model, datasets, optimizer,
sharded state and jitted steps.

Each takes the config (and what an earlier builder returned), so a program reads as the data
flow: mesh -> input pipeline -> model/optimizer -> sharded state -> jitted steps.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import optax
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from vcmamba_jax import convert
from vcmamba_jax import data as data_lib
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.data import image_folder as image_folder_lib
from vcmamba_jax.models import create_model
from vcmamba_jax.models.options import ComputeOptions
from vcmamba_jax.train import distillation, optim, steps
from vcmamba_jax.train import state as state_lib

# The batch fields the jitted steps read (the pipeline also yields bookkeeping fields).
TRAIN_KEYS = ('image', 'label', 'num_skipped')
EVAL_KEYS = ('image', 'label', 'mask', 'num_skipped')


# ------------------------------------------------------------------------------------------------
# Process set-up.
# ------------------------------------------------------------------------------------------------


def enable_compilation_cache(setting: str, workdir: str | None) -> str | None:
  """Turns on JAX's persistent compilation cache; returns its directory (None: off).

  `setting`: 'auto' = $JAX_COMPILATION_CACHE_DIR if set, else `<workdir>/xla_cache` (so a resumed
  run or a rerun of the same command skips the minutes-long GPU compile of the train step);
  '' or 'off' = leave JAX's setting alone; any other value = that directory.
  """
  if setting in ('', 'off'):
    return None
  if setting == 'auto':
    path = os.environ.get('JAX_COMPILATION_CACHE_DIR') or (
      os.path.join(workdir, 'xla_cache') if workdir else None
    )
  else:
    path = setting
  if path:
    jax.config.update('jax_compilation_cache_dir', path)
  return path


# ------------------------------------------------------------------------------------------------
# Checks of a config against the devices and the data.
# ------------------------------------------------------------------------------------------------


def check_batch_sizes(config: ConfigDict) -> None:
  """Global batch sizes must split evenly over the devices (one clear error otherwise)."""
  for name in ('global_batch_size', 'eval_batch_size'):
    size = config[name]
    if size <= 0 or size % jax.device_count():
      raise ValueError(
        f'config.{name}={size} must be a positive multiple of the number of '
        f'devices ({jax.device_count()}).'
      )


# TPU compiler releases that crash (a segmentation fault inside libtpu) on a program of ours, and
# the first release seen to compile it: (TPU generation, model name suffix, first good libtpu).
# Found by compiling for the topology on a CPU host (scripts/aot_compile.py): libtpu 0.0.42.1
# (jax 0.10.2's) crashes on VCMamba-B's train step for v6e (the backward pass of its E = 1024
# Mamba layers); 0.0.48.1 (jax 0.11.2's) and 0.0.52 compile it.
LIBTPU_CRASHES = (('TPU v6', 'vcmamba_b', (0, 0, 48, 1)),)


def _version_tuple(version: str) -> tuple[int, ...]:
  return tuple(int(part) for part in version.split('.') if part.isdigit())


def check_compiler(config: ConfigDict, device_kind: str, libtpu: str | None = None) -> None:
  """Refuses, with the fix, a TPU program that the libtpu in use is known to crash on (a
  segmentation fault of the compiler would end the run with no message). `libtpu`: its version,
  default the installed one."""
  if not device_kind.startswith('TPU'):
    return
  libtpu = libtpu or libtpu_version()
  if not libtpu:
    return
  for generation, model_suffix, first_good in LIBTPU_CRASHES:
    if (
      device_kind.startswith(generation)
      and config.model.name.endswith(model_suffix)
      and _version_tuple(libtpu) < first_good
    ):
      good = '.'.join(map(str, first_good))
      raise RuntimeError(
        f'libtpu {libtpu} crashes compiling {config.model.name} for {device_kind} '
        f'(a known compiler bug, fixed by libtpu {good}). Install a newer one, then rerun: '
        f'pip install "libtpu>={good}" (on Python 3.12+, pip install "jax[tpu]>=0.11.2" '
        'brings it).'
      )


def libtpu_version() -> str | None:
  """The installed libtpu's version, or None."""
  try:
    return importlib.metadata.version('libtpu')
  except importlib.metadata.PackageNotFoundError:
    return None


def check_num_classes(config: ConfigDict) -> None:
  """Checks config.model.num_classes against the data; 0 (or less) takes the data's."""
  folder = image_folder(config)
  if folder is not None:
    num_classes, what = folder.num_classes, f'image folder {folder.root}'
  else:
    num_classes = data_lib.get_num_classes(config.data.dataset, config.data.data_dir)
    what = config.data.dataset
  if config.model.num_classes <= 0:
    config.model.num_classes = num_classes
  elif num_classes != config.model.num_classes:
    raise ValueError(
      f'config.model.num_classes={config.model.num_classes} but {what} has '
      f"{num_classes} classes; pass --config.model.num_classes={num_classes} (or 0: the data's)."
    )


# ------------------------------------------------------------------------------------------------
# Model.
# ------------------------------------------------------------------------------------------------


def model_kwargs(config: ConfigDict) -> dict[str, Any]:
  """`create_model` options from `config.model` (everything but the name); compute options an
  older config lacks take ComputeOptions' defaults."""
  m = config.model
  defaults = ComputeOptions()
  return {
    'num_classes': m.num_classes,
    'img_size': m.img_size,
    'drop_path_rate': m.drop_path_rate,
    'dtype': jnp.dtype(m.dtype),
    'scan_impl': m.scan_impl,
    'remat_scan': m.remat_scan,
    'depthwise_impl': m.get('depthwise_impl', defaults.depthwise_impl),
    'scan_blocks': m.get('scan_blocks', defaults.scan_blocks),
    'remat_mlp': m.get('remat_mlp', defaults.remat_mlp),
  }


def build_model(config: ConfigDict) -> nn.Module:
  """The model of `config.model`."""
  return create_model(config.model.name, **model_kwargs(config))


# ------------------------------------------------------------------------------------------------
# Input pipeline.
# ------------------------------------------------------------------------------------------------


def image_folder(config: ConfigDict) -> image_folder_lib.ImageFolder | None:
  """The image folder of `config.data.image_folder` (vcmamba_jax/configs/finetune.py), or None (TFDS)."""
  d = config.data
  if not d.get('image_folder'):
    return None
  return image_folder_lib.open_image_folder(
    d.image_folder, val_fraction=d.get('val_fraction', 0.1), split_seed=d.get('split_seed', 0)
  )


def open_source(config: ConfigDict, split: str) -> Any:
  """The random-access records of `split`: `config.data.image_folder` when set (a folder of
  class subfolders, vcmamba_jax/configs/finetune.py), else the TFDS dataset `config.data.dataset`."""
  folder = image_folder(config)
  if folder is not None:
    return folder.source(split)
  return data_lib.get_source(config.data.dataset, split, config.data.data_dir)


def train_source(config: ConfigDict) -> Any:
  """The records of `config.data.train_split`."""
  return open_source(config, config.data.train_split)


def steps_per_epoch(config: ConfigDict, num_train_records: int) -> int:
  """Optimizer steps per epoch of `num_train_records` (with repeated augmentation)."""
  return data_lib.train_steps_per_epoch(
    num_train_records, config.global_batch_size, config.data.repeated_aug
  )


def total_train_steps(config: ConfigDict, steps_per_epoch: int) -> int:
  """`config.num_train_steps` when positive, else `config.num_epochs` epochs."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  return config.num_epochs * steps_per_epoch


def make_train_dataset(config: ConfigDict, source: Any) -> grain.IterDataset:
  """The grain train pipeline of `config.data` over `source` (this process's share)."""
  d = config.data
  transform = data_lib.TrainTransform(
    config.model.img_size,
    scale=tuple(d.rrc_scale),
    hflip_prob=d.hflip_prob,
    randaugment=d.randaugment or None,
    interpolation=d.interpolation,
  )
  return data_lib.create_train_dataset(
    source=source,
    global_batch_size=config.global_batch_size,
    image_size=config.model.img_size,
    seed=config.seed,
    repeated_aug=d.repeated_aug,
    num_workers=d.num_workers,
    num_threads=d.num_threads,
    prefetch_batches=d.prefetch_batches,
    transform=transform,
  )


def make_eval_dataset(config: ConfigDict) -> grain.IterDataset:
  """One exact pass over `config.data.eval_split` (the last batch padded and masked)."""
  d = config.data
  return data_lib.create_eval_dataset(
    source=open_source(config, d.eval_split),
    global_batch_size=config.eval_batch_size,
    image_size=config.model.img_size,
    crop_pct=d.eval_crop_pct,
    num_workers=d.num_workers,
    num_threads=d.num_threads,
  )


# ------------------------------------------------------------------------------------------------
# Optimizer and the sharded train state.
# ------------------------------------------------------------------------------------------------


def build_optimizer(
  config: ConfigDict, steps_per_epoch: int
) -> tuple[optim.Schedule, optax.GradientTransformation]:
  """(learning-rate schedule, AdamW of `config.optimizer`)."""
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  return schedule, optim.create_optimizer(config, schedule)


def abstract_train_state(
  config: ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh
) -> tuple[Callable[[jax.Array], state_lib.TrainState], state_lib.TrainState, state_lib.TrainState]:
  """Shape-first: (init, abstract state of ShapeDtypeStructs, matching NamedShardings).

  Nothing is computed or allocated; `state_lib.init_sharded(init, rng, shardings)` creates the
  state, `checkpoint.restore` restores one, `jit(...).lower(abstract_state, ...)` compiles.
  """
  init = state_lib.make_initializer(
    model, tx, image_size=config.model.img_size, use_ema=config.ema_decay > 0
  )
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(config.seed))
  shardings = sharding_lib.state_shardings(mesh, abstract_state, config.mesh.fsdp_min_size)
  return init, abstract_state, shardings


# ------------------------------------------------------------------------------------------------
# Jitted steps.
# ------------------------------------------------------------------------------------------------


def jit_train_step(
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: optim.Schedule,
  config: ConfigDict,
  mesh: Mesh,
  shardings: state_lib.TrainState,
  teacher: distillation.Teacher | None = None,
  task_loss_fn: steps.LossFn | None = None,
):
  """`train_step(state, batch, teacher_variables) -> (state, metrics)` with explicit shardings,
  state donated; `teacher_variables` is `teacher.variables` (`{}` without a teacher)."""
  return jax.jit(
    sharding_lib.traced_under_mesh(
      steps.make_train_step(
        model, tx, schedule, config, teacher.model if teacher else None, task_loss_fn
      ),
      mesh,
    ),
    in_shardings=(
      shardings,
      sharding_lib.batch_sharding(mesh),
      teacher.shardings if teacher else {},
    ),
    out_shardings=(shardings, sharding_lib.replicated(mesh)),
    donate_argnums=(0,),
  )


def jit_eval_step(model: nn.Module, mesh: Mesh, weight_shardings: Mapping[str, Any]):
  """`eval_step(weights, batch, sums) -> sums` with explicit shardings (sums donated)."""
  replicated = sharding_lib.replicated(mesh)
  return jax.jit(
    sharding_lib.traced_under_mesh(steps.make_eval_step(model), mesh),
    in_shardings=(weight_shardings, sharding_lib.batch_sharding(mesh), replicated),
    out_shardings=replicated,
    donate_argnums=(2,),
  )


# ------------------------------------------------------------------------------------------------
# Pretrained weights (init_from, eval_from).
# ------------------------------------------------------------------------------------------------


def fetch_hub_weights(path: str) -> None:
  """Downloads Hub weights into the Hugging Face cache (or finds them there) before anything
  compiles, so that a wrong name or an offline miss fails in seconds, not after the init."""
  if convert.is_hub_path(path):
    logging.info('init_from %s: %s', path, convert.resolve_hub_path(path))


def load_weights(
  source: str,
  model: nn.Module,
  config: ConfigDict,
  *,
  with_ema: bool = False,
  reinit_heads: bool = False,
) -> tuple[dict[str, Any], convert.Weights]:
  """Weights of any source `convert.read_weights` reads, fitted to `model`: pos_embed resized to
  its resolution and, with `reinit_heads` (fine-tuning), heads re-initialised where num_classes
  differs (otherwise that is an error).

  Returns:
    ({'': {'params', 'batch_stats'}, 'ema': ... (with_ema and the source has an EMA)},
     the `convert.Weights` read, for its description and step).
  """
  weights = convert.read_weights(source, config.model.name)
  sets = {'': weights.variables}
  if with_ema and weights.ema:
    sets['ema'] = weights.ema
  fitted = {}
  for name, variables in sets.items():
    fitted[name], reinitialised = convert.adapt_variables(
      variables, model, reinit_heads=reinit_heads
    )
    if reinitialised:
      logging.info('Re-initialised %s (num_classes differs from %s).', reinitialised, source)
  return fitted, weights
