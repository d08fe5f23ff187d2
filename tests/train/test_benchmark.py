"""scripts/benchmark.py runs on CPU with the smoke config and a small random teacher (no timing
assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from vcmamba_jax.train import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_reports_every_measurement(imagenet_dir, tmp_path):
  out = tmp_path / 'bench.json'
  result = subprocess.run(
    [
      sys.executable,
      'scripts/benchmark.py',
      '--config=vcmamba_jax/configs/vcmamba_s.py:smoke',
      '--config.data.dataset=imagenet2012',
      f'--config.data.data_dir={imagenet_dir}',
      '--config.model.num_classes=1000',
      # The recipe's step: soft distillation from a (small, random) RegNet teacher.
      '--config.distillation.type=soft',
      '--config.distillation.teacher=regnety_002',
      '--config.distillation.teacher_path=random',
      '--steps=2',
      '--warmup_steps=1',
      '--peak_tflops=1.0',
      f'--json_out={out}',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    check=False,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'train_synthetic' in result.stdout and 'MFU' in result.stdout
  assert 'soft distillation from regnety_002 float32' in result.stdout
  report = json.loads(out.read_text())
  assert report['config']['distillation'] == 'soft'
  assert report['config']['teacher'] == 'regnety_002 float32'
  assert report['device']['count'] == 8 and report['device']['peak_tflops'] == 1.0
  results = report['results']
  assert set(results) == {'train_synthetic', 'eval_synthetic', 'train_real', 'pipeline'}
  for name in ('train_synthetic', 'eval_synthetic', 'train_real'):
    r = results[name]
    assert r['img_per_sec'] > 0 and r['step_time_s'] > 0
    assert r['img_per_sec_per_device'] * 8 == r['img_per_sec']
    assert r['tflops_per_device'] > 0 and r['mfu'] > 0
  assert results['pipeline']['img_per_sec_per_host'] > 0


def test_peak_table():
  assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'bfloat16') == 989.4
  assert benchmark.peak_tflops('NVIDIA H100 80GB HBM3', 'float32') == 494.7
  assert benchmark.peak_tflops('NVIDIA H100 PCIe', 'bfloat16') == 756.0
  assert benchmark.peak_tflops('NVIDIA H200', 'bfloat16') == 989.4
  assert benchmark.peak_tflops('NVIDIA A100-SXM4-80GB', 'bfloat16') == 312.0
  assert benchmark.peak_tflops('TPU v4', 'bfloat16') == 275.0
  assert benchmark.peak_tflops('TPU v5 lite', 'bfloat16') == 197.0
  assert benchmark.peak_tflops('TPU v5p', 'float32') == 459.0
  assert benchmark.peak_tflops('cpu', 'float32') is None


def test_an_eval_only_benchmark_compiles_no_train_step(imagenet_dir):
  # B's train step takes minutes to compile cold on a GPU: an eval-only run must not pay it.
  from tests.train.smoke import smoke_config

  report = benchmark.benchmark(
    smoke_config(imagenet_dir), num_steps=1, warmup=1, modes=['eval_synthetic'], peak=1.0
  )
  assert set(report['results']) == {'eval_synthetic'}
  assert report['results']['eval_synthetic']['img_per_sec'] > 0
  assert 'train_compile_s' not in report and report['eval_compile_s'] > 0
