"""The segmentation benchmark runs the trainer's steps and reports img/s (CPU, smoke config)."""

from __future__ import annotations

from vcmamba_jax.configs import sem_fpn_vcmamba_s_ade20k
from vcmamba_jax.segmentation import benchmark


def test_benchmark_reports_train_and_slide_throughput():
  config = sem_fpn_vcmamba_s_ade20k.get_config('smoke')
  report = benchmark.benchmark(config, num_steps=1, warmup=1, eval_size=(64, 96))
  assert report['train']['batch'] == 8 and report['train']['crop'] == 64
  assert report['slide']['image_size'] == [64, 96]
  for mode in ('train', 'slide'):
    assert report[mode]['img_per_sec'] > 0 and report[mode]['step_time'] > 0
  assert 'img/s' in benchmark.format_table(report)
