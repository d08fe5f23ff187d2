"""Where a compiled step spends its device time: top kernels with the model scope they come from.

`profile_compiled(fn, args, steps)` runs `fn(*args)` under `jax.profiler.trace`, reads the XSpace
the profiler wrote (`jax.profiler.ProfileData`) and sums the device time of every kernel per
step. Each kernel is mapped to the HLO instruction it ran for (the profiler's `hlo_op` stat, or
the kernel name itself for XLA's fusions) and that instruction to its `metadata={op_name=...}` in
the compiled module's text, e.g. `jvp(VCMamba)/stage4/block3/mamba/conv2d/conv_general_dilated`
(`transpose(...)` = the backward pass). So the top of the list reads as model code.

XLA wraps kernels in CUDA graphs (command buffers) by default, which hides them from the
profiler: `scripts/profile_step.py` turns command buffers off for the profiled process.

`median_ms(fn, *args)`: the wall-clock timer of the kernel benchmarks (scripts/check_kernels.py,
scripts/benchmark_scan.py).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


def median_ms(fn: Callable[..., Any], *args, repeats: int = 20) -> float:
  """Median milliseconds of `fn(*args)`, blocked on, over `repeats` calls after one untimed
  call (compilation, autotuning)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


_INSTRUCTION = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPCODE = re.compile(r'^[^=]*?\s([a-z][\w\-]*)\(')


def hlo_op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, metadata op_name)} of every instruction in an HLO module text."""
  table = {}
  for line in hlo_text.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, rest = match.groups()
    op_name = _OP_NAME.search(rest)
    opcode = _OPCODE.search(' ' + rest.split(', metadata=')[0])
    table[name] = (opcode.group(1) if opcode else '?', op_name.group(1) if op_name else '')
  return table


def scope_of(op_name: str) -> str:
  """A readable model scope of an op_name: drops jit(...)/ and the final primitive.

  'jit(train_step)/transpose(jvp(VCMamba))/stage4/block3/mamba/conv2d/conv_general_dilated'
  -> 'bwd stage4/block3/mamba/conv2d [conv_general_dilated]'.
  """
  if not op_name:
    return '(no metadata)'
  parts = op_name.split('/')
  parts = [p for p in parts if not p.startswith('jit(')]
  direction = 'bwd' if any(p.startswith('transpose(') for p in parts) else 'fwd'
  parts = [p for p in parts if not re.match(r'^(transpose|jvp|vmap|checkpoint|remat)\(', p)]
  if not parts:
    return op_name
  prim = parts[-1]
  return f'{direction} {"/".join(parts[:-1]) or "(top)"} [{prim}]'


def _latest_xspace(logdir: str) -> str:
  files = glob.glob(os.path.join(logdir, '**', '*.xplane.pb'), recursive=True)
  if not files:
    raise FileNotFoundError(f'the profiler wrote no *.xplane.pb under {logdir}')
  return max(files, key=os.path.getmtime)


def _stats(event) -> dict[str, Any]:
  try:
    return dict(event.stats)
  except Exception:
    return {}


def device_kernel_times(xspace_path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """Kernel events of the device planes: [{'name', 'hlo_op', 'ns'}], and the line names seen."""
  from jax.profiler import ProfileData

  data = ProfileData.from_file(xspace_path)
  events, line_names = [], []
  for plane in data.planes:
    if not plane.name.startswith('/device:'):
      continue
    for line in plane.lines:
      line_names.append(f'{plane.name}:{line.name}')
      # 'XLA Ops' / 'XLA Modules' / 'Steps' lines summarise the kernel lines: skip them.
      if not line.name.startswith('Stream'):
        continue
      for event in line.events:
        stats = _stats(event)
        hlo_op = stats.get('hlo_op') or stats.get('tf_op') or ''
        events.append({'name': event.name, 'hlo_op': str(hlo_op), 'ns': float(event.duration_ns)})
  return events, line_names


def categorize(kernel: str, opcode: str, op_name: str) -> str:
  """Coarse class of a kernel: conv, matmul, gather/scatter, reduction, elementwise, the Pallas
  scan, the Pallas depthwise conv, transpose/copy, other."""
  k = kernel.lower()
  if '_depthwise_' in k:  # models/depthwise_pallas.py's kernels (named after their functions)
    return 'depthwise conv (pallas)'
  if 'selective_scan' in op_name or '_fwd_kernel' in k or '_bwd_kernel' in k or 'pallas' in k:
    return 'scan (pallas)'
  if 'conv' in k and ('cudnn' in k or 'xmma' in k or 'implicit' in k or 'sm90' in k):
    return 'convolution'
  if opcode == 'custom-call' and 'conv' in op_name:
    return 'convolution'
  if any(name in k for name in ('gemm', 'cublas', 'cutlass', 'nvjet', 'sm90_xmma')):
    return 'matmul'
  if opcode == 'dot':
    return 'matmul'
  if 'scatter' in k or 'gather' in k:
    return 'gather/scatter'
  if 'reduce' in k or 'reduction' in k:
    return 'reduction fusion'
  if 'transpose' in k or 'copy' in k:
    return 'transpose/copy'
  if 'fusion' in k or 'loop' in k or 'input' in k:
    return 'elementwise fusion'
  return 'other'


def profile_compiled(
  fn: Callable[..., Any],
  args_fn: Callable[[], Sequence[Any]],
  *,
  steps: int,
  hlo_text: str,
  logdir: str | None = None,
) -> dict[str, Any]:
  """Traces `steps` calls of `fn(*args_fn())` (after one untraced call); per-step kernel times.

  Returns {'step_ms': device ms per step (sum of kernel times), 'kernels': [...], 'scopes':
  [...], 'categories': {...}, 'num_kernels_per_step', 'lines'}; lists sorted by time, each row
  with ms per step, count per step and the mapped HLO instruction/scope.
  """
  jax.block_until_ready(fn(*args_fn()))
  logdir = logdir or tempfile.mkdtemp(prefix='vcmamba_profile_')
  with jax.profiler.trace(logdir):
    out = None
    for _ in range(steps):
      out = fn(*args_fn())
    jax.block_until_ready(out)
  events, lines = device_kernel_times(_latest_xspace(logdir))
  table = hlo_op_names(hlo_text)
  by_kernel: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    hlo = e['hlo_op'] or e['name']
    key = (e['name'], hlo)
    by_kernel[key][0] += e['ns']
    by_kernel[key][1] += 1
  kernels, scopes = [], collections.defaultdict(lambda: [0.0, 0])
  categories: dict[str, float] = collections.defaultdict(float)
  for (name, hlo), (ns, count) in by_kernel.items():
    opcode, op_name = table.get(hlo, ('?', ''))
    category = categorize(name, opcode, op_name)
    ms = ns / 1e6 / steps
    kernels.append(
      {
        'ms': ms,
        'count': count / steps,
        'kernel': name,
        'hlo_op': hlo,
        'opcode': opcode,
        'scope': scope_of(op_name),
        'category': category,
      }
    )
    categories[category] += ms
    scope = scope_of(op_name)
    scopes[scope][0] += ms
    scopes[scope][1] += count / steps
  kernels.sort(key=lambda r: -r['ms'])
  scope_rows = sorted(
    ({'scope': s, 'ms': v[0], 'count': v[1]} for s, v in scopes.items()), key=lambda r: -r['ms']
  )
  return {
    'step_ms': sum(r['ms'] for r in kernels),
    'num_kernels_per_step': sum(r['count'] for r in kernels),
    'kernels': kernels,
    'scopes': scope_rows,
    'categories': dict(sorted(categories.items(), key=lambda kv: -kv[1])),
    'lines': sorted(set(lines)),
  }


def format_profile(title: str, profile: dict[str, Any], top: int = 25) -> str:
  """Text report: categories, the top kernels and the top model scopes."""
  total = profile['step_ms'] or 1.0
  lines = [
    f'== {title}: {profile["step_ms"]:.2f} ms of kernel time per step, '
    f'{profile["num_kernels_per_step"]:.0f} kernels per step',
    'by category:',
  ]
  for category, ms in profile['categories'].items():
    lines.append(f'  {category:<22}{ms:>9.3f} ms {100 * ms / total:>5.1f}%')
  lines.append(f'top {top} kernels (ms/step, calls/step, kernel, hlo op, model scope):')
  for r in profile['kernels'][:top]:
    kernel = r['kernel'] if len(r['kernel']) <= 48 else r['kernel'][:45] + '...'
    lines.append(
      f'  {r["ms"]:>8.3f} {r["count"]:>4.0f}  {kernel:<48} {r["hlo_op"][:36]:<36} {r["scope"]}'
    )
  lines.append(f'top {top} model scopes (ms/step, kernels/step):')
  for r in profile['scopes'][:top]:
    lines.append(f'  {r["ms"]:>8.3f} {r["count"]:>5.0f}  {r["scope"]}')
  return '\n'.join(lines)
