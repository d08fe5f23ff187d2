"""The VCMamba ImageNet-1k recipe (paper / upstream DeiT scripts), shared by every config file.

Each config file calls `imagenet_recipe(model_name)` and changes what differs. Reference for every
number: section 7 of the upstream spec (DeiT `main.py` + the authors' training scripts).

Learning rate: peak = optimizer.base_lr * global_batch_size / optimizer.base_batch_size, i.e.
1e-3 * 1024 / 512 = 2e-3 at the default global batch of 1024 (DeiT's linear scaling rule; the
authors ran 128 per GPU on 9 GPUs, 1152 images, peak 2.25e-3). Changing `global_batch_size`
rescales the peak automatically; set `optimizer.base_batch_size` to the batch size itself to pin
the peak at `base_lr`.

Distillation: as the authors (DeiT's recipe), the student's dist_head learns from a RegNetY-160
teacher by soft distillation: loss = 0.5 * CE(head, mixed targets) + 0.5 * KD(dist_head, teacher)
(alpha 0.5, tau 1; see vcmamba_jax/train/distillation.py). The teacher's weights are DeiT's
https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth (or timm's
`timm/regnety_160.deit_in1k`); pass --config.distillation.teacher_path=... . Without a teacher
(--config.distillation.type=none) both heads learn from the labels: loss = (1 - w) * CE(head) +
w * CE(dist_head) with w = `loss.dist_head_weight` = 0.5, the loss of the golden reference tests.
w = 0 trains only `head` (dist_head then stays at its init and drags the averaged eval logits, so
keep w > 0 unless you evaluate `head` alone). Smoke runs distil nothing.
"""

from __future__ import annotations

from ml_collections import config_dict

IMAGENET_TRAIN_IMAGES = 1_281_167


def parse_arg(arg: str | None, **flags: bool) -> config_dict.ConfigDict:
  """Parses the `:arg` of `--config=file.py:arg`: comma-separated names of boolean `flags`.

  Example: `parse_arg('smoke', smoke=False)` -> ConfigDict(smoke=True).
  """
  parsed = config_dict.ConfigDict(dict(flags))
  for name in filter(None, (arg or '').split(',')):
    if name not in flags:
      raise ValueError(f'unknown config argument {name!r}; known: {sorted(flags)}')
    parsed[name] = True
  return parsed


def imagenet_recipe(model_name: str) -> config_dict.ConfigDict:
  """The full-scale 300-epoch ImageNet-1k recipe for `model_name` (unlocked ConfigDict)."""
  config = config_dict.ConfigDict()
  config.mode = 'train'  # 'train', or 'eval': evaluate a checkpoint (see eval_from) and exit.
  config.seed = 0  # model init, data order, augmentation and drop-path randomness.
  # 'auto': jax.distributed.initialize() when the environment describes a multi-process job
  # (JAX_COORDINATOR_ADDRESS, SLURM, Open MPI, multi-host Cloud TPU); 'on' / 'off' force it.
  config.distributed = 'auto'
  # JAX persistent compilation cache: 'auto' = $JAX_COMPILATION_CACHE_DIR, else <workdir>/xla_cache
  # (a resumed run reuses the compiled train step); '' = off; or a directory.
  config.compilation_cache_dir = 'auto'

  config.model = config_dict.ConfigDict()
  config.model.name = model_name
  config.model.num_classes = 1000
  config.model.img_size = 224  # training/eval resolution; fixes the pos_embed grid.
  config.model.drop_path_rate = 0.2
  config.model.dtype = 'float32'  # compute dtype; 'bfloat16' = mixed precision (fp32 params).
  # Selective scan: 'auto' (the fused kernel on GPU) | 'associative' | 'sequential' | 'fused'.
  config.model.scan_impl = 'auto'
  config.model.remat_scan = True  # recompute the scan in the backward pass (saves memory).
  # Depthwise convs: 'auto' (training: the Pallas kernels on GPUs, B on an H100 72.0 ms a step
  # against 81.3 with 'taps'; 'taps' elsewhere; inference: cuDNN) | 'taps' (shifted multiply-adds
  # with a hand-written VJP) | 'xla' (cuDNN: its grouped kernels were 10x slower at some shapes
  # on an H200) | 'matmul' | 'pallas'.
  config.model.depthwise_impl = 'auto'
  # Each stage's FFN blocks as one nn.scan: a shorter train-step compile (B: 57 -> 52 s on an
  # H100) for 14% slower steps; the same parameters and numbers (models/options.py).
  config.model.scan_blocks = False
  # The conv Mlp's GELU outputs recomputed in the backward pass: 'none' | 'fc2_input' | 'all'
  # (B on an H100: 13.1 / 9.5 / 7.6 GiB peak at batch 128, steps within 2%; models/options.py).
  config.model.remat_mlp = 'fc2_input'

  config.data = config_dict.ConfigDict()
  config.data.dataset = 'imagenet2012'  # TFDS name, ArrayRecord format.
  config.data.data_dir = config_dict.placeholder(str)  # TFDS data dir (None: TFDS default).
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.rrc_scale = (0.08, 1.0)  # RandomResizedCrop area range.
  config.data.hflip_prob = 0.5
  config.data.randaugment = 'rand-m9-mstd0.5-inc1'  # timm string; '' disables.
  config.data.interpolation = 'bicubic'
  config.data.repeated_aug = 3  # DeiT RASampler repeats; 1 = off.
  config.data.eval_crop_pct = 0.875  # eval: resize shorter side to size / crop_pct, centre crop.
  config.data.num_workers = 8  # grain worker processes per host (0: threads in-process).
  config.data.num_threads = config_dict.placeholder(int)  # decode threads (None: data default).
  config.data.prefetch_batches = 2

  # Device-side augmentation (inside the jitted train step).
  config.aug = config_dict.ConfigDict()
  config.aug.mixup_alpha = 0.8
  config.aug.cutmix_alpha = 1.0
  config.aug.mixup_switch_prob = 0.5  # P(cutmix) when both are on.
  config.aug.mixup_prob = 1.0
  config.aug.label_smoothing = 0.1
  config.aug.random_erasing_prob = 0.25
  config.aug.random_erasing_mode = 'pixel'

  config.global_batch_size = 1024  # over all devices and hosts.
  config.eval_batch_size = 1024  # global eval batch (the last one is padded and masked).
  config.num_epochs = 300
  config.num_train_steps = -1  # > 0 overrides num_epochs (smoke runs, benchmarks).

  config.optimizer = config_dict.ConfigDict()
  config.optimizer.base_lr = 1e-3  # peak lr at base_batch_size; scaled linearly with the batch.
  config.optimizer.base_batch_size = 512
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 0.05  # decoupled (AdamW); biases/norms/D exempt (upstream).
  config.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 = off (upstream: off).

  # timm cosine schedule: warmup_lr -> peak over warmup_epochs, cosine to min_lr at decay_epochs.
  config.schedule = config_dict.ConfigDict()
  config.schedule.warmup_epochs = 5
  config.schedule.warmup_lr = 1e-6
  config.schedule.min_lr = 1e-5
  config.schedule.decay_epochs = 300  # timm t_initial.
  # False: timm's per-epoch stepping (lr constant within an epoch; epoch 0 at warmup_lr, epoch
  # e >= 1 at f(e - 1)), as upstream. True: the same curve evaluated at every step.
  config.schedule.per_step = False

  config.loss = config_dict.ConfigDict()
  config.loss.dist_head_weight = 0.5  # distillation.type 'none' only: see the module docstring.

  # DeiT distillation (the released scripts: soft, RegNetY-160, alpha 0.5, tau 1).
  config.distillation = config_dict.ConfigDict()
  config.distillation.type = 'soft'  # 'soft' (KL) | 'hard' (CE on the teacher's argmax) | 'none'
  config.distillation.teacher = 'regnety_160'  # a RegNet of vcmamba_jax.models.regnet.VARIANTS
  # DeiT's regnety_160-a5fe301d.pth, a timm .pth/.safetensors, 'hf-hub:timm/regnety_160.deit_in1k'
  # (downloaded into the Hub cache), or 'random' (random weights: benchmarks and tests only).
  config.distillation.teacher_path = ''
  config.distillation.alpha = 0.5  # weight of the KD term; 1 - alpha on CE(head).
  config.distillation.tau = 1.0  # temperature of soft KD.
  config.distillation.dtype = 'float32'  # teacher compute dtype ('bfloat16': faster); fp32 params.
  config.distillation.fsdp = False  # shard the teacher's weights over the fsdp axis (else copies).

  config.ema_decay = 0.99996  # timm ModelEma v1, every step; 0 disables the EMA.

  config.mesh = config_dict.ConfigDict()
  config.mesh.fsdp = 1  # size of the fsdp mesh axis (-1: all devices); 1 = data parallel.
  config.mesh.fsdp_min_size = 2**14  # arrays smaller than this stay replicated under fsdp.

  config.log_every_steps = 100
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 3
  config.eval_every_epochs = 1  # plus a final eval; 0 = final only.

  # Pretrained weights for a fine-tune: one of our checkpoints (workdir, checkpoints dir or step
  # dir), an exported model directory, or a PyTorch .pth/.npz/.safetensors. pos_embed is resized
  # to model.img_size and heads are re-initialised when num_classes differs.
  config.init_from = ''
  # mode=eval: what to evaluate ('' = the workdir's latest checkpoint, else init_from).
  config.eval_from = ''

  # A non-finite loss or gradient is never applied (params, optimizer, BN stats and EMA stay
  # unchanged). False = then stop with an error naming the steps (at the next log step; nothing
  # is saved after the last good one); True = go on and count the skipped updates.
  config.skip_nonfinite_updates = False

  # Resuming checks the workdir's stored config: changes that break an exact resume (seed,
  # global batch, model, data stream, augmentation, EMA) are refused unless this is True.
  config.force_resume = False
  return config


def smoke(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """Turns a recipe into a seconds-long CPU run on the offline digits data (same code paths)."""
  config.model.name = 'vcmamba_nano'
  config.model.num_classes = 10
  config.model.img_size = 32
  config.model.drop_path_rate = 0.1
  config.data.dataset = 'vcmamba_digits'
  config.data.num_workers = 0
  config.global_batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 12
  # Learn within a dozen steps: a high peak lr at once (no warmup); the 300-epoch cosine keeps
  # it nearly constant over a few epochs of any dataset.
  config.optimizer.base_lr = 1e-2
  config.optimizer.base_batch_size = config.global_batch_size  # peak = base_lr
  config.schedule.warmup_epochs = 0
  config.schedule.per_step = True
  config.log_every_steps = 4
  config.checkpoint_every_steps = 6
  config.eval_every_epochs = 0
  config.ema_decay = 0.9
  config.distillation.type = 'none'  # no teacher file needed (tests add a small random one)
  return config
