"""Input pipeline: TFDS ArrayRecord sources, grain train/eval iterators, host transforms, and
jittable device-side ops (normalise, random erasing, mixup/cutmix).

Importing this package registers the offline `vcmamba_digits` TFDS dataset.
"""

from vcmamba_jax.data.datasets import (
    DIGITS,
    IMAGENET,
    FakeImagenet,
    VcmambaDigits,
    get_num_classes,
    get_source,
    prepare_digits,
    prepare_imagenet2012,
    write_fake_imagenet_manual_dir,
)
from vcmamba_jax.data.device_ops import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    mixup_cutmix,
    normalize,
    one_hot_smoothed,
    random_erasing,
)
from vcmamba_jax.data.pipeline import (
    BOOKKEEPING_KEYS,
    create_eval_dataset,
    create_eval_iterator,
    create_train_dataset,
    create_train_iterator,
    eval_num_batches,
    eval_shard_bounds,
    measure_throughput,
    samples_per_epoch,
    train_steps_per_epoch,
)
from vcmamba_jax.data.transforms import (
    DEFAULT_CROP_PCT,
    DEFAULT_RANDAUGMENT,
    IMAGENET_MEAN_PIXEL,
    EvalTransform,
    ImageDecodeError,
    RandAugment,
    TrainTransform,
    decode_image,
    eval_preprocess,
    eval_resize_size,
    imagenet_class_names,
    imagenet_synsets,
    parse_randaugment,
    random_resized_crop_box,
)

__all__ = [
    'BOOKKEEPING_KEYS', 'DEFAULT_CROP_PCT', 'DEFAULT_RANDAUGMENT', 'DIGITS', 'IMAGENET',
    'IMAGENET_MEAN', 'IMAGENET_MEAN_PIXEL', 'IMAGENET_STD', 'EvalTransform', 'FakeImagenet',
    'ImageDecodeError', 'RandAugment', 'TrainTransform', 'VcmambaDigits', 'create_eval_dataset',
    'create_eval_iterator', 'create_train_dataset', 'create_train_iterator', 'decode_image',
    'eval_num_batches', 'eval_preprocess', 'eval_resize_size', 'eval_shard_bounds',
    'get_num_classes', 'get_source', 'imagenet_class_names', 'imagenet_synsets',
    'measure_throughput', 'mixup_cutmix', 'normalize', 'one_hot_smoothed', 'parse_randaugment',
    'prepare_digits', 'prepare_imagenet2012', 'random_erasing', 'random_resized_crop_box',
    'samples_per_epoch', 'train_steps_per_epoch', 'write_fake_imagenet_manual_dir',
]
