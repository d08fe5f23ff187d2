"""The authors' ADE20K Semantic-FPN recipe (upstream spec section 8.1; mmseg 0.29.1 configs
``configs/sem_fpn/fpn_mcnn_{s,b}_ade20k_40k.py``), shared by the segmentation config files.

40,000 iterations of batch 32 (8 GPUs x 4), AdamW lr 2e-4, weight decay 1e-4 on every parameter,
poly decay (power 0.9) to 0 per iteration, no warmup, fp32, no clipping; BatchNorm statistics over
the global batch (SyncBN); eval (slide 512/341) and a checkpoint every 4,000 iterations. The
backbone starts from the ImageNet weights (``init_from``: the authors' VCMamba-{S,B}.pth, a
classification run or an exported model); the neck and head from mmseg's initialisation.
"""

from __future__ import annotations

from ml_collections import config_dict

ADE20K_TRAIN_IMAGES = 20_210


def ade20k_recipe(model_name: str) -> config_dict.ConfigDict:
  config = config_dict.ConfigDict()
  config.task = 'segmentation'
  config.mode = 'train'  # 'train' | 'eval' (eval_from, else the workdir's latest checkpoint)
  config.seed = 0
  config.distributed = 'auto'

  config.model = config_dict.ConfigDict()
  config.model.name = model_name  # sem_fpn_vcmamba_{s,m,b}
  config.model.num_classes = 150
  config.model.img_size = 512  # training crop; pos_embed grid 16x16
  config.model.drop_path_rate = 0.2
  config.model.dropout_ratio = 0.1  # Dropout2d before conv_seg
  config.model.dtype = 'float32'
  config.model.scan_impl = 'auto'
  config.model.remat_scan = True
  config.model.depthwise_impl = 'auto'  # as in configs/common.py
  config.model.scan_blocks = False  # as in configs/common.py
  config.model.remat_mlp = 'fc2_input'  # as in configs/common.py
  # init_from's 7x7 pos_embed -> 16x16: 'bicubic' (correct) or 'upstream' (the authors' scrambling
  # reshape, quirk 6, to replicate their fine-tuning exactly).
  config.model.pos_embed_resize = 'bicubic'

  config.data = config_dict.ConfigDict()
  config.data.dataset = 'vcmamba_ade20k'  # scripts/prepare_ade20k.py builds it
  config.data.data_dir = config_dict.placeholder(str)
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.scale = (2048, 512)  # Resize img_scale (train, ratio 0.5-2.0) and AlignResize (test)
  config.data.ratio_range = (0.5, 2.0)
  config.data.cat_max_ratio = 0.75
  config.data.hflip_prob = 0.5
  config.data.photometric = True
  config.data.num_workers = 8
  config.data.num_threads = config_dict.placeholder(int)
  config.data.prefetch_batches = 2

  config.eval = config_dict.ConfigDict()
  config.eval.crop = 512  # slide inference (the authors' test_cfg)
  config.eval.stride = 341
  config.eval.max_windows = 6  # most windows of an AlignResized ADE20K image (1 x 6 at 512x2048)
  # Fixed canvases (static shapes, one compiled eval program): AlignResized images (<= 2048 long,
  # <= 512 short, either orientation) and the original-size labels the metrics are computed on.
  config.eval.image_canvas = (2048, 2048)
  config.eval.label_canvas = (2048, 2048)
  config.eval.size_divisor = 32

  config.global_batch_size = 32
  config.eval_batch_size = 8  # one image per device on 8 devices
  config.num_train_steps = 40_000
  config.num_epochs = 1  # unused: iteration-based (num_train_steps)

  config.optimizer = config_dict.ConfigDict()
  config.optimizer.base_lr = 2e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 1e-4  # every parameter (mmseg: no paramwise_cfg)
  config.optimizer.grad_clip_norm = 0.0

  config.schedule = config_dict.ConfigDict()
  config.schedule.power = 0.9  # poly
  config.schedule.min_lr = 0.0

  config.ema_decay = 0.0
  config.mesh = config_dict.ConfigDict()
  config.mesh.fsdp = 1
  config.mesh.fsdp_min_size = 2**14

  config.log_every_steps = 50
  config.checkpoint_every_steps = 4_000
  config.keep_checkpoints = 3
  config.eval_every_steps = 4_000  # plus a final eval
  config.eval_every_epochs = 0

  config.init_from = ''  # ImageNet weights of the backbone (see the module docstring)
  config.eval_from = ''
  config.skip_nonfinite_updates = False
  config.debug = config_dict.ConfigDict()
  config.debug.nan_at_step = -1
  return config


def smoke(config: config_dict.ConfigDict) -> config_dict.ConfigDict:
  """A CPU run on a synthetic ADE20K (same code paths): nano model, 64 px crops. Prepare the data
  with `python scripts/prepare_ade20k.py --fake --data_dir=DIR`, pass --config.data.data_dir=DIR."""
  config.model.name = 'sem_fpn_vcmamba_nano'
  config.model.img_size = 64
  config.model.drop_path_rate = 0.1
  config.data.scale = (256, 64)
  config.data.num_workers = 0
  config.eval.crop = 64
  config.eval.stride = 43
  config.eval.max_windows = 6
  config.eval.image_canvas = (256, 256)
  config.eval.label_canvas = (320, 320)
  config.global_batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 12
  config.optimizer.base_lr = 2e-3
  config.log_every_steps = 4
  config.checkpoint_every_steps = 6
  config.eval_every_steps = 0
  return config
