r"""Semantic-FPN training and slide-inference speed (img/s) of a segmentation config.

  python scripts/benchmark_segmentation.py --config=vcmamba_jax/configs/sem_fpn_vcmamba_b_ade20k.py \
      --config.model.dtype=bfloat16 --config.global_batch_size=16 --config.eval_batch_size=8 \
      --json_out=bench_seg_b.json
  python scripts/benchmark_segmentation.py --config=vcmamba_jax/configs/sem_fpn_vcmamba_s_ade20k.py:smoke

Train: the trainer's jitted step on synthetic 512x512 crops (global_batch_size). Slide: the eval
step of training (512 windows, stride 341, resize to the image, argmax, areas) on synthetic
images of --eval_size (default 512 704), eval_batch_size per step. What is measured:
`vcmamba_jax/segmentation/benchmark.py`.
"""

from __future__ import annotations

import json

import jax
from absl import app, flags
from ml_collections import config_flags

from vcmamba_jax.segmentation import benchmark as benchmark_lib
from vcmamba_jax.train import metrics as metrics_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Segmentation config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement.')
_WARMUP = flags.DEFINE_integer('warmup_steps', 2, 'Untimed steps first (compilation).')
_MODES = flags.DEFINE_list('modes', 'train,slide', 'What to measure.')
_EVAL_SIZE = flags.DEFINE_list('eval_size', '512,704', 'Slide: image height,width.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Write the results as JSON here.')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics_lib.quiet_library_logs()
  report = benchmark_lib.benchmark(
    _CONFIG.value,
    num_steps=_STEPS.value,
    warmup=_WARMUP.value,
    modes=_MODES.value,
    eval_size=tuple(int(v) for v in _EVAL_SIZE.value),
  )
  if jax.process_index() == 0:
    print(benchmark_lib.format_table(report))
    if _JSON_OUT.value:
      with open(_JSON_OUT.value, 'w') as f:
        json.dump(report, f, indent=2)


if __name__ == '__main__':
  app.run(main)
