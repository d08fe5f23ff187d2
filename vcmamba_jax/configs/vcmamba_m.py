r"""VCMamba-M (21.0M params) on ImageNet-1k, 300 epochs, the paper's recipe.

Command (one host with 8 GPUs; on a multi-host TPU slice or GPU cluster run it on every host,
adding --config.distributed=on where the environment is not auto-detected, see common.py):

  python main.py --config=vcmamba_jax/configs/vcmamba_m.py --workdir=runs/vcmamba_m \
      --config.data.data_dir=$TFDS_DATA_DIR \
      --config.distillation.teacher_path=$HOME/regnety_160-a5fe301d.pth

Hardware: one host with 8x H100 80GB (or 8x A100; a TPU v4-32/v5p-32 slice), float32 as
upstream; mixed precision (bfloat16 compute, float32 parameters and optimizer) with
--config.model.dtype=bfloat16. Global batch 1024 (128 per device on 8), peak lr 2e-3.
Expected: 81.5% ImageNet-1k top-1 (paper); with soft distillation from DeiT's RegNetY-160
teacher as the authors (download https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth;
--config.distillation.type=none trains without it, on labels only: expect a little less).
Raw and EMA weights are evaluated every epoch.
img/s (one H200, bf16, synthetic data, batch 128 train / 256 eval, scripts/benchmark.py,
2026-12-02 (train/eval of an earlier build of the same day)): 2,045 img/s train (62.6 ms/step, peak 8.47 GiB), 10,583 img/s eval; with the
RegNetY-160 teacher (soft, teacher in bf16) 1,507 img/s train (peak 9.46 GiB). README "Speed".
Time: 300 epochs with the teacher at that rate on 8 such GPUs, ~9 h (if it scales linearly).

Smoke test (about a minute on a laptop CPU, mostly compilation; vcmamba_nano at 32 px on the
offline digits data, the recipe's code paths unchanged):

  python main.py --config=vcmamba_jax/configs/vcmamba_m.py:smoke --workdir=/tmp/smoke
"""

from vcmamba_jax.configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  config = common.imagenet_recipe('vcmamba_m')
  return common.smoke(config) if args.smoke else config
