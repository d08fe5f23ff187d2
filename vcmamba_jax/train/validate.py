"""Checks a training/eval config before anything is read, compiled or written.

`validate_config(config)` raises one `ConfigError` listing every invalid field of the recipe
(`vcmamba_jax/configs/common.py`) with the value it got and what it accepts, so a typo costs a second, not
a dataset load and a compile. Fields this module does not know (added by other features) are
left to their owners.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from ml_collections import ConfigDict

from vcmamba_jax.models.options import DEPTHWISE_IMPLS, REMAT_MLP
from vcmamba_jax.models.scan import SCAN_IMPLS

MODES = ('train', 'eval')
DTYPES = ('float32', 'bfloat16')
INTERPOLATIONS = ('bicubic', 'bilinear', 'random')
ERASING_MODES = ('pixel', 'rand', 'const')
DISTRIBUTED = ('auto', 'on', 'off')
# Datasets that build themselves into data_dir on first use (so data_dir may not exist yet).
SELF_BUILDING_DATASETS = ('vcmamba_digits',)


class ConfigError(ValueError):
  """An invalid config value; the message names the field, the value and the fix."""


def _is_int(v: Any) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_at_least(low: int) -> Callable[[Any], str | None]:
  def check(v):
    return None if _is_int(v) and v >= low else f'an integer >= {low}'

  return check


def _number_in(low: float, high: float, *, high_open: bool = False, low_open: bool = False):
  def check(v):
    if not _is_number(v):
      return 'a finite number'
    ok_low = v > low if low_open else v >= low
    ok_high = v < high if high_open else v <= high
    if ok_low and ok_high:
      return None
    return f'a number in {"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'

  return check


def _positive(v):
  return None if _is_number(v) and v > 0 else 'a number > 0'


def _non_negative(v):
  return None if _is_number(v) and v >= 0 else 'a number >= 0'


def _one_of(choices: Sequence[str]):
  def check(v):
    return None if v in choices else 'one of ' + ', '.join(repr(c) for c in choices)

  return check


def _boolean(v):
  return None if isinstance(v, bool) else 'True or False'


def _non_empty_str(v):
  return None if isinstance(v, str) and v else 'a non-empty string'


def _model_name(v):
  from vcmamba_jax.models import VARIANTS
  from vcmamba_jax.segmentation.model import SEG_MODELS  # config.task = 'segmentation'

  names = sorted(VARIANTS) + sorted(SEG_MODELS)
  return None if v in names else 'one of ' + ', '.join(names)


def _train_steps(v):
  return None if _is_int(v) and (v == -1 or v >= 1) else '-1 (use num_epochs) or an integer >= 1'


def _fsdp(v):
  return None if _is_int(v) and (v == -1 or v >= 1) else '-1 (all devices) or an integer >= 1'


def _optional_int_at_least(low: int):
  def check(v):
    return None if v is None or (_is_int(v) and v >= low) else f'None or an integer >= {low}'

  return check


def _crop_scale(v):
  try:
    low, high = (float(x) for x in v)
  except (TypeError, ValueError):
    return 'two numbers (min, max) with 0 < min <= max <= 1'
  return None if 0 < low <= high <= 1 else 'two numbers (min, max) with 0 < min <= max <= 1'


def _weights_path(v):
  if not isinstance(v, str):
    return "a path ('' for none)"
  if not v or re.match(r'[A-Za-z][\w+.-]+:', v) or os.path.exists(os.path.expanduser(v)):
    return None  # '' = none; remote ones (hf-hub:, gs://) are checked when they are read
  return 'an existing file or directory (no such path)'


# (dotted field, check returning None or what the field accepts). Order = the recipe's order.
_RULES: list[tuple[str, Callable[[Any], str | None]]] = [
  ('mode', _one_of(MODES)),
  ('seed', _int_at_least(0)),
  ('distributed', _one_of(DISTRIBUTED)),
  ('model.name', _model_name),
  ('model.num_classes', _int_at_least(0)),  # 0: the data's class count
  ('model.img_size', _int_at_least(32)),
  ('model.drop_path_rate', _number_in(0, 1, high_open=True)),
  ('model.dtype', _one_of(DTYPES)),
  ('model.scan_impl', _one_of(SCAN_IMPLS)),
  ('model.remat_scan', _boolean),
  ('model.depthwise_impl', _one_of(DEPTHWISE_IMPLS)),
  ('model.scan_blocks', _boolean),
  ('model.remat_mlp', _one_of(REMAT_MLP)),
  ('data.dataset', _non_empty_str),
  ('data.train_split', _non_empty_str),
  ('data.eval_split', _non_empty_str),
  ('data.rrc_scale', _crop_scale),
  ('data.hflip_prob', _number_in(0, 1)),
  ('data.interpolation', _one_of(INTERPOLATIONS)),
  ('data.repeated_aug', _int_at_least(1)),
  ('data.eval_crop_pct', _number_in(0, 1, low_open=True)),
  ('data.num_workers', _int_at_least(0)),
  ('data.num_threads', _optional_int_at_least(1)),
  ('data.prefetch_batches', _int_at_least(1)),
  ('aug.mixup_alpha', _non_negative),
  ('aug.cutmix_alpha', _non_negative),
  ('aug.mixup_switch_prob', _number_in(0, 1)),
  ('aug.mixup_prob', _number_in(0, 1)),
  ('aug.label_smoothing', _number_in(0, 1, high_open=True)),
  ('aug.random_erasing_prob', _number_in(0, 1)),
  ('aug.random_erasing_mode', _one_of(ERASING_MODES)),
  ('global_batch_size', _int_at_least(1)),
  ('eval_batch_size', _int_at_least(1)),
  ('num_epochs', _int_at_least(1)),
  ('num_train_steps', _train_steps),
  ('optimizer.base_lr', _positive),
  ('optimizer.base_batch_size', _int_at_least(1)),
  ('optimizer.b1', _number_in(0, 1, high_open=True)),
  ('optimizer.b2', _number_in(0, 1, high_open=True)),
  ('optimizer.eps', _positive),
  ('optimizer.weight_decay', _non_negative),
  ('optimizer.grad_clip_norm', _non_negative),
  ('schedule.warmup_epochs', _non_negative),
  ('schedule.warmup_lr', _non_negative),
  ('schedule.min_lr', _non_negative),
  ('schedule.decay_epochs', _positive),
  ('schedule.per_step', _boolean),
  ('loss.dist_head_weight', _number_in(0, 1)),
  ('ema_decay', _number_in(0, 1, high_open=True)),
  ('mesh.fsdp', _fsdp),
  ('mesh.fsdp_min_size', _int_at_least(0)),
  ('log_every_steps', _int_at_least(1)),
  ('checkpoint_every_steps', _int_at_least(1)),
  ('keep_checkpoints', _int_at_least(1)),
  ('eval_every_epochs', _int_at_least(0)),
  ('init_from', _weights_path),
  ('eval_from', _weights_path),
  ('skip_nonfinite_updates', _boolean),
  ('force_resume', _boolean),
]


def _lookup(config: ConfigDict, dotted: str) -> tuple[bool, Any]:
  node: Any = config
  for part in dotted.split('.'):
    if not isinstance(node, ConfigDict) or part not in node:
      return False, None
    node = node[part]
  return True, node


def problems(config: ConfigDict) -> list[str]:
  """Every invalid field as 'config.<field>=<value> must be <what>' (empty: the config is ok)."""
  found = []
  for field, check in _RULES:
    present, value = _lookup(config, field)
    if not present:
      continue  # a reduced config (e.g. a notebook's); the code that reads it will complain
    accepted = check(value)
    if accepted is not None:
      found.append(f'config.{field}={value!r} must be {accepted}')
  present, data_dir = _lookup(config, 'data.data_dir')
  if present and data_dir is not None:
    _, dataset = _lookup(config, 'data.dataset')
    if not isinstance(data_dir, str) or not data_dir:
      found.append(f'config.data.data_dir={data_dir!r} must be None (TFDS default) or a path')
    elif (
      '://' not in data_dir
      and not os.path.isdir(os.path.expanduser(data_dir))
      and dataset not in SELF_BUILDING_DATASETS
    ):
      found.append(
        f'config.data.data_dir={data_dir!r} does not exist; pass the TFDS data dir that holds '
        f'{dataset} (scripts/prepare_imagenet.py builds imagenet2012 there)'
      )
  return found


def validate_config(config: ConfigDict) -> None:
  """Raises one ConfigError (a single line) naming every invalid field; touches no files."""
  found = problems(config)
  if found:
    raise ConfigError('invalid config: ' + '; '.join(found))
