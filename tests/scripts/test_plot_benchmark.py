"""scripts/plot_benchmark.py: benchmark JSON (single reports and sweeps) -> PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tests.scripts.conftest import SCRIPTS, load_script

pytest.importorskip('matplotlib')
plot_benchmark = load_script('plot_benchmark')


def report(model: str, batch: int, train: float, infer: float) -> dict:
  return {
    'config': {
      'model': model,
      'img_size': 224,
      'dtype': 'bfloat16',
      'global_batch_size': batch,
      'eval_batch_size': batch,
    },
    'device': {'kind': 'NVIDIA H200', 'count': 1},
    'results': {
      'train_synthetic': {'img_per_sec': train},
      'eval_synthetic': {'img_per_sec': infer},
    },
  }


def test_sweep_json_becomes_lines_per_variant(tmp_path):
  sweep = {'sweep': [report('vcmamba_b', b, 10.0 * b, 40.0 * b) for b in (256, 64, 128)]}
  (tmp_path / 'b.json').write_text(json.dumps(sweep))
  (tmp_path / 's.json').write_text(json.dumps(report('vcmamba_s', 128, 2000.0, 9000.0)))
  data = plot_benchmark.curves(
    plot_benchmark.read_reports([tmp_path / 'b.json', tmp_path / 's.json'])
  )
  assert data['train'][('vcmamba_b', 'bfloat16')] == [(64, 640.0), (128, 1280.0), (256, 2560.0)]
  assert data['inference'][('vcmamba_s', 'bfloat16')] == [(128, 9000.0)]
  output = tmp_path / 'plot.png'
  argv = ['--ours', str(tmp_path / 'b.json'), str(tmp_path / 's.json'), '--output', str(output)]
  argv += ['--pytorch', str(SCRIPTS.parent / 'docs/benchmarks/pytorch_h200.json')]
  assert plot_benchmark.main(argv) == 0
  pixels = np.asarray(Image.open(output).convert('RGB'))
  assert pixels.shape == (400, 1000, 3)
  orange = np.all(np.abs(pixels.astype(int) - (0xD9, 0x5F, 0x02)) < 30, axis=-1)
  assert orange.sum() > 200  # the vcmamba_b line is drawn


def test_readme_numbers_plot_as_bars(tmp_path):
  output = tmp_path / 'bars.png'
  benchmarks = SCRIPTS.parent / 'docs/benchmarks'
  argv = [
    '--ours',
    str(benchmarks / 'h200_bf16_readme.json'),
    '--pytorch',
    str(benchmarks / 'pytorch_h200.json'),
  ]
  assert plot_benchmark.main([*argv, '--output', str(output)]) == 0
  assert Image.open(output).size == (1000, 420)
  (tmp_path / 'bad.json').write_text('{"results": {}}')
  assert plot_benchmark.main(['--ours', str(tmp_path / 'bad.json'), '--output', str(output)]) == 1
