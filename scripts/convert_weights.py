r"""Converts VCMamba weights between the authors' PyTorch format and vcmamba_jax exported models.

PyTorch -> exported model directory (read by ``scripts/predict.py --weights``, evaluation and
the trainer's ``init_from``, or ``vcmamba_jax.load_pretrained`` in a notebook):

  python scripts/convert_weights.py --input VCMamba-B.pth --output weights/vcmamba_b --verify

``--input`` is a raw state_dict or a training checkpoint of the authors' ``main.py`` (the
state_dict under 'state_dict', 'model' or 'model_ema', in that order of preference), as .pth/.pt,
.npz or .safetensors. The variant is detected from the tensor shapes (or pass ``--model``); the
resolution and class count come from ``pos_embed`` and the head. ``--img_size 256`` stores the
model for another resolution (``pos_embed`` is resized bicubically, as upstream does).

Exported directory (or any file the above accepts) -> PyTorch names and layouts, for the
authors' code:

  python scripts/convert_weights.py --to_pytorch --input weights/vcmamba_b --output b.pth
  python scripts/convert_weights.py --to_pytorch --input weights/vcmamba_b --output b.safetensors

A .pth holds ``{'model': state_dict}`` by default, which is what the authors' ``main.py --eval
--resume`` reads (``--pytorch_container none`` writes the bare state_dict for
``model.load_state_dict``); .safetensors and .npz hold the flat state_dict. BatchNorm
``num_batches_tracked`` entries (0) are included so that ``load_state_dict(strict=True)`` works.

``--verify`` reloads what was written, checks that every array is bit-identical to the converted
ones, and runs the jitted model on a random input, printing logit statistics.
Exit status: 0 on success, 1 on a conversion or verification error, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from vcmamba_jax import convert
from vcmamba_jax.convert import pretrained as pretrained_lib
from vcmamba_jax.models import vcmamba as vcmamba_lib

PYTORCH_SUFFIXES = ('.pth', '.pt', '.safetensors', '.npz')


def variant_name(path: str, model: vcmamba_lib.VCMamba) -> str:
  """The registered variant name of a loaded model: from the config of an exported directory,
  else the variant whose depths/widths/Mamba layers the model has."""
  if not convert.is_hub_path(path) and convert.is_exported_model(path):
    return pretrained_lib.read_exported_config(path)[0]
  name = vcmamba_lib.variant_name(model)
  if name is not None:
    return name
  raise convert.CheckpointError(f'{path}: the model matches no registered variant; pass --model')


def count_parameters(variables: dict[str, Any]) -> tuple[int, int]:
  """(all parameters, parameters without dist_head)."""

  total = vcmamba_lib.num_params(variables['params'])
  return total, total - vcmamba_lib.num_params(variables['params'].get('dist_head', {}))


def write_pytorch_file(state: dict[str, np.ndarray], path: str, container: str = 'model') -> None:
  """Writes a PyTorch-named state_dict as .pth/.pt (``{'model': state}`` or bare), .safetensors
  or .npz. The file appears atomically (written under a temporary name, then renamed)."""
  suffix = os.path.splitext(path)[1].lower()
  tmp = path + '.tmp' + suffix  # keep the suffix: np.savez appends .npz otherwise
  state = {k: np.require(v, requirements=['C', 'W']) for k, v in state.items()}
  if suffix in ('.pth', '.pt'):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        "writing .pth needs PyTorch (pip install 'vcmamba_jax[torch]'); "
        'or write .safetensors, which needs only safetensors'
      ) from e
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    torch.save({'model': tensors} if container == 'model' else tensors, tmp)
  elif suffix == '.safetensors':
    from safetensors.numpy import save_file

    save_file(state, tmp, metadata={'format': 'pt'})
  elif suffix == '.npz':
    np.savez(tmp, **state)
  else:
    raise ValueError(f'unsupported output format {suffix!r}: use one of {PYTORCH_SUFFIXES}')
  os.replace(tmp, path)


def _flat(variables: dict[str, Any]) -> dict[tuple[str, ...], np.ndarray]:
  return {
    path: np.asarray(value)
    for path, value in traverse_util.flatten_dict(
      {c: variables[c] for c in ('params', 'batch_stats')}
    ).items()
  }


def verify(path: str, name: str, expected: dict[str, Any]) -> str:
  """Reloads ``path``, checks it against ``expected`` bit for bit and runs a jitted forward on
  a random input. Returns a report; raises CheckpointError on any difference or a non-finite
  output."""
  model, variables = convert.load_pretrained(path, name)
  want, got = _flat(expected), _flat(variables)
  if set(want) != set(got):
    raise convert.CheckpointError(f'verify: {path} holds other variables than were converted')
  differing = sorted(
    '/'.join(p)
    for p in want
    if want[p].shape != got[p].shape or not np.array_equal(want[p], got[p])
  )
  if differing:
    raise convert.CheckpointError(
      f'verify: {len(differing)} arrays of {path} differ from the converted ones: {differing[:8]}'
    )
  lines = [f'verify: reloaded {path}: {len(want)} arrays bit-identical']

  size = model.img_size
  images = jax.random.normal(jax.random.key(0), (1, size, size, 3), jnp.float32)
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
  start = time.perf_counter()
  logits = np.asarray(forward(variables, images))
  seconds = time.perf_counter() - start
  if not np.all(np.isfinite(logits)):
    raise convert.CheckpointError('verify: the forward produced non-finite logits')
  probs = np.asarray(jax.nn.softmax(logits[0]))
  top5 = np.argsort(-probs, kind='stable')[:5]
  lines.append(
    f'verify: jitted forward on a random [1, {size}, {size}, 3] input '
    f'({seconds:.1f} s incl. compile): logits {list(logits.shape)} '
    f'mean {logits.mean():+.4f} std {logits.std():.4f} min {logits.min():+.4f} '
    f'max {logits.max():+.4f}; top-5 classes {top5.tolist()}, '
    f'max probability {probs.max():.4f}'
  )
  return '\n'.join(lines)


def _check_output(path: str, overwrite: bool) -> None:
  if not os.path.exists(path) or overwrite:
    return
  if os.path.isdir(path) and not os.listdir(path):
    return
  raise FileExistsError(f'{path} already exists; pass --overwrite to replace it')


def convert_weights(args: argparse.Namespace) -> str:
  """Runs one conversion as described by the parsed command line; returns the summary."""
  source = args.input if convert.is_hub_path(args.input) else os.path.abspath(args.input)
  output = os.path.abspath(args.output)
  if source == output:
    raise ValueError('--input and --output are the same path')
  suffix = os.path.splitext(output)[1].lower()
  if args.to_pytorch and suffix not in PYTORCH_SUFFIXES:
    raise ValueError(
      f'--to_pytorch writes a file: give --output a name ending in one of '
      f'{PYTORCH_SUFFIXES}, got {args.output!r}'
    )
  if not args.to_pytorch and suffix in PYTORCH_SUFFIXES:
    raise ValueError(
      f'--output {args.output!r} looks like a PyTorch file, but without '
      '--to_pytorch the output is an exported model directory; pass '
      '--to_pytorch or choose a directory name'
    )
  _check_output(output, args.overwrite)

  overrides = {'img_size': args.img_size} if args.img_size else {}
  print(f'reading {args.input} ...', file=sys.stderr, flush=True)
  start = time.perf_counter()
  model, variables = convert.load_pretrained(source, args.model, **overrides)
  print(
    f'read {args.input} in {time.perf_counter() - start:.1f} s; writing {args.output} ...',
    file=sys.stderr,
    flush=True,
  )
  name = args.model or variant_name(source, model)
  model_kwargs = {field: getattr(model, field) for field in pretrained_lib.EXPORTED_FIELDS}
  if args.to_pytorch:
    os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
    write_pytorch_file(
      convert.to_pytorch_state_dict(variables, name), output, args.pytorch_container
    )
  else:
    convert.save_pretrained(output, variables, name, **model_kwargs)

  params, without_dist = count_parameters(variables)
  grid = vcmamba_lib.grid_size(model.img_size)
  lines = [
    f'converted {args.input} -> {args.output}',
    f'  model        {name}',
    f'  params       {params:,} ({without_dist:,} without dist_head)',
    f'  img_size     {model.img_size} (pos_embed {grid}x{grid})',
    f'  num_classes  {model.num_classes}',
  ]
  if args.to_pytorch:
    layout = (
      "{'model': state_dict}"
      if suffix in ('.pth', '.pt') and args.pytorch_container == 'model'
      else 'flat state_dict'
    )
    lines.append(f'  format       PyTorch names and layouts, {suffix} ({layout})')
  else:
    lines.append(
      '  format       vcmamba_jax exported model (model.safetensors + config.json + README.md; '
      f'upload with `hf upload USER/REPO {args.output}`)'
    )
  print('\n'.join(lines), flush=True)
  if args.verify:
    print(verify(output, name, variables), flush=True)
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description='Convert VCMamba weights: PyTorch checkpoint -> exported vcmamba_jax model '
    'directory, or back with --to_pytorch.',
    epilog='Example: convert_weights.py --input VCMamba-B.pth --output weights/vcmamba_b --verify',
  )
  parser.add_argument(
    '--input',
    required=True,
    help='PyTorch checkpoint (.pth/.pt/.npz/.safetensors; raw state_dict or '
    'training checkpoint) or, with --to_pytorch, an exported directory',
  )
  parser.add_argument(
    '--output',
    required=True,
    help='exported model directory to write (or, with --to_pytorch, a '
    '.pth/.pt/.safetensors/.npz file)',
  )
  parser.add_argument(
    '--model',
    choices=vcmamba_lib.list_models(),
    default=None,
    help='variant; detected from the weights when omitted',
  )
  parser.add_argument(
    '--img_size',
    type=int,
    default=None,
    help='store the model for this resolution (pos_embed resized '
    "bicubically); default: the checkpoint's",
  )
  parser.add_argument(
    '--to_pytorch', action='store_true', help='convert to PyTorch names and layouts instead'
  )
  parser.add_argument(
    '--pytorch_container',
    choices=('model', 'none'),
    default='model',
    help="with --to_pytorch to .pth: wrap the state_dict as {'model': ...} "
    "(what the authors' main.py --resume reads) or write it bare",
  )
  parser.add_argument(
    '--verify',
    action='store_true',
    help='reload the output, compare it bit for bit and run a jitted forward on a random input',
  )
  parser.add_argument('--overwrite', action='store_true', help='replace an existing output')
  args = parser.parse_args(argv)
  if args.img_size is not None and args.img_size < 32:
    parser.error(f'--img_size must be at least 32, got {args.img_size}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    convert_weights(args)
  except (convert.CheckpointError, OSError, ImportError, ValueError) as e:
    # OSError covers FileNotFoundError/FileExistsError; CheckpointError is a ValueError.
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
