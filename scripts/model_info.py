r"""Parameter counts and compute cost (GMACs) of the VCMamba variants; no weights needed.

  python scripts/model_info.py                      # vcmamba_s, vcmamba_m, vcmamba_b at 224
  python scripts/model_info.py --models vcmamba_b --img_size 256
  python scripts/model_info.py --json               # machine-readable
  python scripts/model_info.py --no_flops           # parameters only (no compilation, seconds)

Parameters come from ``jax.eval_shape`` of the initialiser (nothing is allocated). Counts include
both heads (as the paper's 10.5M / 21.0M / 31.5M do); the count without ``dist_head`` is what a
plain classifier of the same backbone has. BatchNorm running statistics are buffers, not
parameters.

Two compute numbers are printed for the jitted eval forward at batch 1 (``--batch_size``):

- ``GMACs (XLA)``: ``flops / 2`` from XLA's cost analysis of the compiled forward
  (``jax.jit(f).lower(...).compile().cost_analysis()``, a dict in this jax version, a list of
  per-program dicts in older ones). XLA counts every floating-point operation: besides the
  convolutions and matmuls (2 flops per multiply-add) it counts each elementwise op (eval
  BatchNorm, which is not folded into the convolutions, GELU, residual adds, layer scale,
  LayerNorm, softplus, ...) and the whole selective scan (the associative scan's combine steps over every
  direction). Halving this total therefore lands above the paper's numbers.
- ``GMACs (conv+matmul)``: multiply-accumulates of every convolution and ``dot_general`` in the
  forward's jaxpr (loop bodies multiplied by their trip count), i.e. what fvcore/thop-style
  counters report and what the paper's 1.1 / 2.3 / 4.0 GMACs measure. It includes the scan's
  output contraction ``y = sum_n h[n] * C[n]`` (an einsum) but none of the elementwise work.

At 224 px (jax 0.10.2, CPU):

  model       params       w/o dist_head  GMACs (XLA)  GMACs (conv+matmul)  paper
  vcmamba_s   10,478,720   10,189,720     1.400        1.049                10.5M / 1.1
  vcmamba_m   21,072,176   20,623,176     2.807        2.284                21.0M / 2.3
  vcmamba_b   31,450,832   30,937,832     4.643        3.961                31.5M / 4.0

Parameters and the conv+matmul count depend only on shapes. XLA's count is backend-specific
(on GPU, for instance, convolutions become cuDNN custom calls that it may not cost): the table
above is from CPU, which is what this script is meant to run on (JAX_PLATFORMS=cpu).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from vcmamba_jax.models import vcmamba as vcmamba_lib

DEFAULT_MODELS = ('vcmamba_s', 'vcmamba_m', 'vcmamba_b')
# The authors' README table (224 px): parameters (millions) and GMACs.
PAPER = {
  'vcmamba_s': {'params_m': 10.5, 'gmacs': 1.1},
  'vcmamba_m': {'params_m': 21.0, 'gmacs': 2.3},
  'vcmamba_b': {'params_m': 31.5, 'gmacs': 4.0},
}


def _size(tree: Any) -> int:
  return vcmamba_lib.num_params(tree)


def count_parameters(name: str, img_size: int = 224, **model_kwargs) -> dict[str, int]:
  """Parameter counts of a variant from its abstract variables (``jax.eval_shape``).

  Returns:
    ``{'params': all trainable parameters (both heads), 'params_without_dist_head': ...,
    'batch_stats': BatchNorm running mean/var entries (buffers, not parameters)}``.
  """
  model = vcmamba_lib.create_model(name, img_size=img_size, **model_kwargs)
  variables = vcmamba_lib.abstract_variables(model)
  params = variables['params']
  total = _size(params)
  return {
    'params': total,
    'params_without_dist_head': total - _size(params['dist_head']),
    'batch_stats': _size(variables['batch_stats']),
  }


def _eval_forward(model: vcmamba_lib.VCMamba):
  return lambda variables, images: model.apply(variables, images, train=False)[0]


def xla_cost(
  name: str, img_size: int = 224, batch_size: int = 1, **model_kwargs
) -> dict[str, float]:
  """XLA's cost analysis of the compiled, jitted eval forward on float32 [batch, S, S, 3].

  Returns ``{'flops', 'transcendentals', 'bytes_accessed', 'compile_s'}`` (flops count a
  multiply-add as 2; see the module docstring for what is included).
  """
  model = vcmamba_lib.create_model(name, img_size=img_size, **model_kwargs)
  variables = vcmamba_lib.abstract_variables(model)
  images = jax.ShapeDtypeStruct((batch_size, img_size, img_size, 3), jnp.float32)
  start = time.perf_counter()
  compiled = jax.jit(_eval_forward(model)).lower(variables, images).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.cost_analysis()
  # jax >= 0.4.3x returns one dict; older versions a list with one dict per device program.
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  if not analysis or 'flops' not in analysis:
    raise RuntimeError(
      f"XLA's cost analysis on {jax.default_backend()} reported no flops; "
      'run on CPU (JAX_PLATFORMS=cpu) or pass --no_flops'
    )
  return {
    'flops': float(analysis['flops']),
    'transcendentals': float(analysis.get('transcendentals', 0.0)),
    'bytes_accessed': float(analysis.get('bytes accessed', 0.0)),
    'compile_s': compile_s,
  }


def _dot_general_macs(eqn) -> int:
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  lhs_shape = eqn.invars[0].aval.shape
  contracted = math.prod(lhs_shape[d] for d in lhs_contract)
  return math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_macs(eqn) -> int:
  rhs_shape = eqn.invars[1].aval.shape
  out_features = rhs_shape[eqn.params['dimension_numbers'].rhs_spec[0]]
  # Each output element takes (in_channels / groups) * kernel_h * kernel_w multiply-adds.
  return math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs_shape) // out_features


def _jaxpr_macs(jaxpr: jax_core.Jaxpr) -> tuple[int, bool]:
  """(conv + dot_general MACs, whether a while loop of unknown trip count was counted once)."""
  total, inexact = 0, False
  for eqn in jaxpr.eqns:
    primitive = eqn.primitive.name
    if primitive == 'dot_general':
      total += _dot_general_macs(eqn)
    elif primitive == 'conv_general_dilated':
      total += _conv_macs(eqn)
    elif primitive == 'cond':  # only one branch runs: count the most expensive
      branches = [_jaxpr_macs(branch.jaxpr) for branch in eqn.params['branches']]
      total += max(macs for macs, _ in branches)
      inexact |= any(flag for _, flag in branches)
    else:
      repeats = eqn.params['length'] if primitive == 'scan' else 1
      inexact |= primitive == 'while'
      for sub in jax_core.jaxprs_in_params(eqn.params):
        macs, flag = _jaxpr_macs(sub)
        total += repeats * macs
        inexact |= flag
  return total, inexact


def matmul_macs(name: str, img_size: int = 224, batch_size: int = 1, **model_kwargs) -> int:
  """Multiply-accumulates of all convolutions and matmuls (dot_general) of the eval forward,
  from its jaxpr (no compilation)."""
  model = vcmamba_lib.create_model(name, img_size=img_size, **model_kwargs)
  variables = vcmamba_lib.abstract_variables(model)
  images = jax.ShapeDtypeStruct((batch_size, img_size, img_size, 3), jnp.float32)
  closed = jax.make_jaxpr(_eval_forward(model))(variables, images)
  macs, inexact = _jaxpr_macs(closed.jaxpr)
  if inexact:
    raise RuntimeError(
      f'{name}: the forward contains a while loop whose trip count is '
      "unknown; use the default scan_impl='associative'"
    )
  return macs


def model_info(
  name: str, img_size: int = 224, *, batch_size: int = 1, flops: bool = True, **model_kwargs
) -> dict[str, Any]:
  """Everything this script prints for one variant, as a JSON-serialisable dict."""
  info: dict[str, Any] = {'model': name, 'img_size': img_size, 'batch_size': batch_size}
  info.update(count_parameters(name, img_size, **model_kwargs))
  if flops:
    info['gmacs_matmul'] = matmul_macs(name, img_size, batch_size, **model_kwargs) / 1e9
    cost = xla_cost(name, img_size, batch_size, **model_kwargs)
    info['gmacs_xla'] = cost['flops'] / 2 / 1e9
    info['xla_flops'] = cost['flops']
    info['xla_transcendentals'] = cost['transcendentals']
    info['compile_s'] = round(cost['compile_s'], 1)
    info['backend'] = jax.default_backend()
  if name in PAPER and img_size == 224:
    info['paper'] = PAPER[name]
  return info


def _table(rows: list[dict[str, Any]]) -> str:
  header = (
    f'{"model":<13} {"img":>4} {"params":>12} {"w/o dist_head":>14}'
    f' {"GMACs (XLA)":>12} {"GMACs (conv+matmul)":>20} {"paper (M / GMACs)":>18}'
  )
  lines = [header, '-' * len(header)]
  for row in rows:
    xla = f'{row["gmacs_xla"]:.3f}' if 'gmacs_xla' in row else '-'
    matmul = f'{row["gmacs_matmul"]:.3f}' if 'gmacs_matmul' in row else '-'
    paper = f'{row["paper"]["params_m"]} / {row["paper"]["gmacs"]}' if 'paper' in row else '-'
    lines.append(
      f'{row["model"]:<13} {row["img_size"]:>4} {row["params"]:>12,}'
      f' {row["params_without_dist_head"]:>14,} {xla:>12} {matmul:>20}'
      f' {paper:>18}'
    )
  if rows and rows[0]['batch_size'] != 1:
    lines.append(f'(GMACs for batch {rows[0]["batch_size"]})')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description='Parameters and GMACs of VCMamba variants (no weights needed).',
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    '--models',
    nargs='+',
    default=list(DEFAULT_MODELS),
    choices=vcmamba_lib.list_models(),
    metavar='NAME',
    help=f'variants, from {vcmamba_lib.list_models()}',
  )
  parser.add_argument('--img_size', type=int, default=224, help='input resolution')
  parser.add_argument('--batch_size', type=int, default=1, help='batch for the GMACs')
  parser.add_argument(
    '--no_flops',
    action='store_true',
    help='parameters only: skip tracing and compiling the forward',
  )
  parser.add_argument('--json', action='store_true', help='print a JSON list instead of a table')
  args = parser.parse_args(argv)
  if args.img_size < 32:
    parser.error(f'--img_size must be at least 32, got {args.img_size}')
  if args.batch_size < 1:
    parser.error(f'--batch_size must be positive, got {args.batch_size}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  rows = []
  for name in args.models:
    rows.append(
      model_info(name, args.img_size, batch_size=args.batch_size, flops=not args.no_flops)
    )
    if not args.json:
      print(
        f'{name}: done'
        + (f' (compiled in {rows[-1]["compile_s"]} s)' if 'compile_s' in rows[-1] else ''),
        file=sys.stderr,
      )
  if args.json:
    print(json.dumps(rows, indent=2, default=lambda x: np.asarray(x).tolist()))
  else:
    print(_table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
