"""Input pipeline: TFDS ArrayRecord sources, grain train/eval iterators, host transforms, and
jittable device-side ops (normalise, random erasing, mixup/cutmix).

Importing the package is cheap and has no side effects: every name below is imported from its
module on first use, so `import vcmamba_jax.data` (or `.transforms`, what grain workers run)
pulls in neither jax nor tensorflow_datasets. The offline `vcmamba_digits` TFDS dataset is
registered when `datasets` is first used (e.g. `get_source`), not on import.
"""

import importlib

_EXPORTS = {
  'DIGITS': 'datasets',
  'IMAGENET': 'datasets',
  'FakeImagenet': 'datasets',
  'VcmambaDigits': 'datasets',
  'get_num_classes': 'datasets',
  'get_source': 'datasets',
  'prepare_digits': 'datasets',
  'prepare_imagenet2012': 'datasets',
  'write_fake_imagenet_manual_dir': 'datasets',
  'IMAGENET_MEAN': 'device_ops',
  'IMAGENET_STD': 'device_ops',
  'mixup_cutmix': 'device_ops',
  'normalize': 'device_ops',
  'one_hot_smoothed': 'device_ops',
  'random_erasing': 'device_ops',
  'symmetric_betas': 'device_ops',
  'BOOKKEEPING_KEYS': 'pipeline',
  'create_eval_dataset': 'pipeline',
  'create_train_dataset': 'pipeline',
  'eval_num_batches': 'pipeline',
  'eval_shard_bounds': 'pipeline',
  'measure_throughput': 'pipeline',
  'samples_per_epoch': 'pipeline',
  'train_steps_per_epoch': 'pipeline',
  'create_train_iterator': 'iterators',
  'create_eval_iterator': 'iterators',
  'DEFAULT_CROP_PCT': 'transforms',
  'DEFAULT_RANDAUGMENT': 'transforms',
  'IMAGENET_MEAN_PIXEL': 'transforms',
  'EvalTransform': 'transforms',
  'ImageDecodeError': 'transforms',
  'RandAugment': 'transforms',
  'TrainTransform': 'transforms',
  'decode_image': 'transforms',
  'eval_preprocess': 'transforms',
  'eval_resize_size': 'transforms',
  'imagenet_class_names': 'transforms',
  'imagenet_synsets': 'transforms',
  'parse_randaugment': 'transforms',
  'random_resized_crop_box': 'transforms',
}


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f'vcmamba_jax.data.{_EXPORTS[name]}'), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
  raise AttributeError(f"module 'vcmamba_jax.data' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))


__all__ = sorted(_EXPORTS)
