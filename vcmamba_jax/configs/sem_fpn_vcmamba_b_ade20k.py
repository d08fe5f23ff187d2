r"""Semantic FPN + VCMamba-B on ADE20K (150 classes), 40k iterations, the authors' recipe
(vcmamba_jax/configs/segmentation.py; paper: 47.1 mIoU for B, single-scale slide inference).

Speed (one H200, bf16, scripts/benchmark_segmentation.py, 2026-12-02): 144.1 img/s train
(111.0 ms/step of 16 crops of 512), 131.1 img/s slide inference (512x704, batch 8), peak 14.9 GiB.

Data: python scripts/prepare_ade20k.py --manual_dir=DIR_WITH_ADEChallengeData2016.zip \
        --data_dir=$TFDS_DATA_DIR

Command (one host with 8 GPUs, batch 32 = 4 per GPU; multi-host: run it on every host):

  python main.py --config=vcmamba_jax/configs/sem_fpn_vcmamba_b_ade20k.py --workdir=runs/fpn_b \
      --config.data.data_dir=$TFDS_DATA_DIR --config.init_from=VCMamba-B.pth

Evaluate a run or the authors' mmseg checkpoint (slide 512/341, mIoU/mAcc/aAcc, per-class IoU):

  python main.py --config=vcmamba_jax/configs/sem_fpn_vcmamba_b_ade20k.py --workdir=runs/fpn_b \
      --config.mode=eval [--config.eval_from=fpn_vcmamba_b.pth]

Smoke test (CPU; nano model, 64 px crops, synthetic ADE20K):

  python scripts/prepare_ade20k.py --fake --data_dir=/tmp/fake_ade
  python main.py --config=vcmamba_jax/configs/sem_fpn_vcmamba_b_ade20k.py:smoke --workdir=/tmp/seg_smoke \
      --config.data.data_dir=/tmp/fake_ade
"""

from vcmamba_jax.configs import common, segmentation


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  config = segmentation.ade20k_recipe('sem_fpn_vcmamba_b')
  return segmentation.smoke(config) if args.smoke else config
