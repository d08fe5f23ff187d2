r"""Plots img/s against batch size per variant (train and inference) from scripts/benchmark.py JSON,
beside the PyTorch reference numbers.

  python scripts/plot_benchmark.py --ours sweep_s.json sweep_b.json \
      --pytorch docs/benchmarks/pytorch_h200.json --output docs/img/speed_h200.png
  # the README figure, from the numbers measured so far:
  python scripts/plot_benchmark.py --ours docs/benchmarks/h200_bf16_readme.json \
      --pytorch docs/benchmarks/pytorch_h200.json --output docs/img/speed_h200.png

--ours takes benchmark JSON files: single reports (`--json_out`) or sweeps (`--batch_sizes`,
{"sweep": [report, ...]}); reports of the same model and dtype form one line. Needs matplotlib
(`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from collections.abc import Sequence
from typing import Any

MODES = (
  ('train_synthetic', 'global_batch_size', 'train'),
  ('eval_synthetic', 'eval_batch_size', 'inference'),
)
COLOURS = {'vcmamba_s': '#1b9e77', 'vcmamba_m': '#7570b3', 'vcmamba_b': '#d95f02'}
MARKERS = ('s', 'D', '^', 'v', 'P', 'X')


def read_reports(paths: Sequence[str]) -> list[dict[str, Any]]:
  reports = []
  for path in paths:
    with open(path) as f:
      data = json.load(f)
    items = data['sweep'] if isinstance(data, dict) and 'sweep' in data else [data]
    for report in items:
      if 'config' not in report or 'results' not in report:
        raise ValueError(f'{path}: not scripts/benchmark.py output (no config/results)')
      reports.append(report)
  return reports


def curves(reports: list[dict[str, Any]]) -> dict[str, dict[tuple[str, str], list]]:
  """{mode: {(model, dtype): [(batch, img/s), ...] sorted}} for the train/eval measurements."""
  out: dict[str, dict] = {label: collections.defaultdict(list) for _, _, label in MODES}
  for report in reports:
    config = report['config']
    for key, batch_field, label in MODES:
      result = report['results'].get(key)
      if result and 'img_per_sec' in result:
        out[label][(config['model'], config['dtype'])].append(
          (int(config[batch_field]), float(result['img_per_sec']))
        )
  return {label: {k: sorted(v) for k, v in lines.items()} for label, lines in out.items()}


def plot_bars(data, pytorch: dict[str, Any] | None, output: str, title: str) -> None:
  """One batch size per variant (no sweep yet): horizontal bars, ours against each PyTorch
  setting, for train and inference."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100)
  for axis, (_, _, label) in zip(axes, MODES):
    rows = []
    for (model, dtype), points in sorted(data[label].items(), reverse=True):
      batch, rate = points[0]
      rows.append((f'{model}: ours ({dtype}), batch {batch}', rate, 0.0, COLOURS.get(model), True))
      for entry in (pytorch or {}).get('entries', []):
        if entry['model'] != model:
          continue
        point = entry['train' if label == 'train' else 'eval']
        low, high = point['img_per_sec']
        rows.append(
          (
            f'{model}: {entry["setting"]}',
            (low + high) / 2,
            (high - low) / 2,
            COLOURS.get(model),
            False,
          )
        )
    names, rates, errors, colours, ours = zip(*rows)
    positions = list(range(len(rows)))
    axis.barh(
      positions,
      rates,
      xerr=[e or float('nan') for e in errors] if any(errors) else None,
      color=[c if o else 'white' for c, o in zip(colours, ours)],
      edgecolor=colours,
      capsize=2,
    )
    for y, rate in zip(positions, rates):
      axis.text(rate, y, f' {rate:,.0f}', va='center', fontsize=7)
    axis.set_yticks(positions, names, fontsize=7)
    axis.set_xlabel('images / s')
    axis.set_title(label)
    axis.set_xlim(0, max(rates) * 1.18)
    axis.grid(axis='x', alpha=0.3)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout(rect=(0, 0, 1, 0.95))
  figure.savefig(output)
  plt.close(figure)


def plot(reports, pytorch: dict[str, Any] | None, output: str, title: str) -> None:
  """Lines of img/s against batch size per variant (a sweep), PyTorch numbers as markers; bars
  when every variant was measured at one batch size only."""
  data = curves(reports)
  if all(len(points) == 1 for lines in data.values() for points in lines.values()):
    plot_bars(data, pytorch, output, title + ' (one batch size per variant: no sweep yet)')
    return
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
  settings = sorted({e['setting'] for e in (pytorch or {}).get('entries', [])})
  for axis, (_, _, label) in zip(axes, MODES):
    for (model, dtype), points in sorted(data[label].items()):
      batches, rates = zip(*points)
      axis.plot(
        batches, rates, '-o', color=COLOURS.get(model, 'black'), label=f'{model} (ours, {dtype})'
      )
    for entry in (pytorch or {}).get('entries', []):
      point = entry['train' if label == 'train' else 'eval']
      low, high = point['img_per_sec']
      marker = MARKERS[settings.index(entry['setting']) % len(MARKERS)]
      axis.errorbar(
        [point['batch']],
        [(low + high) / 2],
        yerr=[[(high - low) / 2], [(high - low) / 2]],
        fmt=marker,
        mfc='none',
        color=COLOURS.get(entry['model'], 'grey'),
        label=f'{entry["model"]}: {entry["setting"]}',
        capsize=3,
      )
    axis.set_xscale('log', base=2)
    axis.set_xlabel('batch size')
    axis.set_ylabel('images / s')
    axis.set_title(label)
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  figure.legend(handles, labels, loc='lower center', ncol=3, fontsize=7, frameon=False)
  figure.suptitle(title, fontsize=10)
  figure.tight_layout(rect=(0, 0.16, 1, 0.95))
  figure.savefig(output)
  plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--ours', nargs='+', required=True, help='scripts/benchmark.py JSON files')
  parser.add_argument('--pytorch', default=None, help='reference numbers (docs/benchmarks/)')
  parser.add_argument('--output', required=True, help='PNG to write')
  parser.add_argument('--title', default=None)
  args = parser.parse_args(argv)
  try:
    reports = read_reports(args.ours)
    pytorch = None
    if args.pytorch:
      with open(args.pytorch) as f:
        pytorch = json.load(f)
  except (OSError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  device = reports[0].get('device', {}).get('kind', '?') if reports else '?'
  img_size = reports[0]['config'].get('img_size', '?') if reports else '?'
  plot(reports, pytorch, args.output, args.title or f'VCMamba at {img_size} px on one {device}')
  print(args.output)
  return 0


if __name__ == '__main__':
  sys.exit(main())
