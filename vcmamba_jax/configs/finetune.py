r"""Fine-tune pretrained VCMamba weights on your own classification data.

  # a folder of class subfolders (DIR/<class>/*.jpg; 10% of each class held out for validation)
  python main.py --config=vcmamba_jax/configs/finetune.py --workdir=runs/pets \
      --config.data.image_folder=~/data/pets
  # ... or with its own split: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg
  # any TFDS image-classification dataset (prepared in ArrayRecord format, see README)
  python main.py --config=vcmamba_jax/configs/finetune.py --workdir=runs/flowers \
      --config.data.dataset=oxford_flowers102 --config.data.eval_split=test
  # another variant / resolution / weights (Hub path, file, exported folder or our checkpoint)
  python main.py --config=vcmamba_jax/configs/finetune.py:b --workdir=runs/flowers_b384 \
      --config.data.dataset=oxford_flowers102 --config.model.img_size=384

Starts from `init_from` (default: the official ImageNet-1k weights of `model.name` on the Hugging
Face Hub); the two heads are re-initialised for the data's class count (`model.num_classes = 0`
reads it from the data) and pos_embed is resized bicubically to `model.img_size`. Everything else
is the trainer of the ImageNet recipe (same pipeline, checkpoints, resume, EMA, sharding).

Defaults for a short schedule on a small dataset (typical transfer settings, not tuned here):
AdamW at peak lr 1e-4 for a global batch of 128 (scaled linearly with the batch), weight decay
0.05, one warmup epoch, cosine to 1e-6 over 30 epochs, drop path 0.1, RandAugment + random
erasing, label smoothing 0.1, no mixup/cutmix and no repeated augmentation (they pay off on long
schedules), no EMA. Evaluation every 5 epochs and at the end.

Config arguments (`vcmamba_jax/configs/finetune.py:ARGS`, comma-separated): `s`, `m`, `b` pick the variant
(default s); `smoke` makes a seconds-long CPU run (vcmamba_nano at 32 px, a few steps; give
init_from and the data).
"""

from ml_collections import config_dict

from vcmamba_jax.configs import common
from vcmamba_jax.convert.registry import PRETRAINED_WEIGHTS

_VARIANTS = {'s': 'vcmamba_s', 'm': 'vcmamba_m', 'b': 'vcmamba_b'}


def get_config(arg=None) -> config_dict.ConfigDict:
  args = common.parse_arg(arg, s=False, m=False, b=False, smoke=False)
  chosen = [name for key, name in _VARIANTS.items() if args[key]]
  if len(chosen) > 1:
    raise ValueError(f'pick one variant of s, m, b, got {chosen}')
  name = chosen[0] if chosen else 'vcmamba_s'
  config = common.imagenet_recipe(name)
  config.init_from = PRETRAINED_WEIGHTS[name]  # the official ImageNet-1k weights on the Hub

  config.model.num_classes = 0  # 0: the number of classes of the data
  config.model.img_size = 224
  config.model.drop_path_rate = 0.1

  # A folder of class subfolders instead of a TFDS dataset (data.dataset is then ignored).
  config.data.image_folder = ''
  config.data.val_fraction = 0.1  # held out per class when the folder has no train/ + val/
  config.data.split_seed = 0  # seeds that hold-out: same seed, same split everywhere
  config.data.dataset = 'oxford_flowers102'
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.repeated_aug = 1

  config.aug.mixup_alpha = 0.0
  config.aug.cutmix_alpha = 0.0
  config.aug.label_smoothing = 0.1
  config.aug.random_erasing_prob = 0.25

  config.global_batch_size = 128
  config.eval_batch_size = 256
  config.num_epochs = 30
  config.optimizer.base_lr = 1e-4
  config.optimizer.base_batch_size = 128
  config.optimizer.weight_decay = 0.05
  config.schedule.warmup_epochs = 1
  config.schedule.warmup_lr = 1e-6
  config.schedule.min_lr = 1e-6
  config.schedule.decay_epochs = config.get_ref('num_epochs')
  config.schedule.per_step = True
  config.ema_decay = 0.0
  config.distillation.type = 'none'  # the ImageNet teacher knows none of the new labels

  config.log_every_steps = 20
  config.checkpoint_every_steps = 500
  config.eval_every_epochs = 5

  if args.smoke:
    config.model.name = 'vcmamba_nano'
    config.init_from = ''
    config.model.img_size = 32
    config.data.randaugment = ''
    config.data.num_workers = 0
    config.aug.random_erasing_prob = 0.0
    config.global_batch_size = 8
    config.eval_batch_size = 8
    config.num_train_steps = 4
    config.optimizer.base_lr = 1e-3
    config.optimizer.base_batch_size = 8
    config.schedule.warmup_epochs = 0
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_every_epochs = 0
  return config
