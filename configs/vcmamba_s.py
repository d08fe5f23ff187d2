r"""VCMamba-S (10.5M params) on ImageNet-1k, 300 epochs, the paper's recipe.

Command (one host with 8 GPUs, or a TPU pod slice: run the same command on every host):

  python main.py --config=configs/vcmamba_s.py --workdir=runs/vcmamba_s \
      --config.data.data_dir=$TFDS_DATA_DIR

Expected: 78.7% top-1 (paper, trained with a RegNetY-160 distillation teacher that this recipe
replaces by label CE on both heads; see configs/common.py). Global batch 1024, peak lr 2e-3.
img/s: see README benchmark table.

Smoke test (seconds on a CPU, tiny model on the offline digits data):

  python main.py --config=configs/vcmamba_s.py:smoke --workdir=/tmp/smoke
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, smoke=False)
  config = common.imagenet_recipe('vcmamba_s')
  return common.smoke(config) if args.smoke else config
