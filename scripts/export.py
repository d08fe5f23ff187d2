r"""Exports a VCMamba's eval forward for serving: a ``jax.export`` artifact that runs with JAX alone.

  python scripts/export.py --weights hf-hub:SLDGroup/VCMamba/VCMamba-B.pth --output serve/b
  python scripts/export.py --weights weights/my_finetune --output serve/ft --platforms cpu,cuda
  python scripts/export.py --weights VCMamba-S.pth --output serve/s --img_size 256 --dtype bfloat16

The directory holds export.json, forward.jax_export (lowered for every --platforms, default cpu,
cuda and tpu, with a symbolic batch dimension) and weights.npz. Serve it with

  import vcmamba_jax
  model = vcmamba_jax.load_exported('serve/b')  # imports jax and numpy only
  logits = model(images)                         # uint8 [B, S, S, 3] eval crops, any B

The program takes uint8 crops (shorter side resized to int(S / crop_pct), bicubic, centre crop S;
``vcmamba_jax.data.eval_preprocess`` does it) and normalises them itself. It uses the pure-XLA
associative scan: the fused Pallas GPU kernels do not serialise portably. With ``--check``, the
export is loaded back and its logits compared with the model's on random crops (two batch sizes).
``--onnx FILE`` also writes ONNX through jax2onnx when it is installed (see
``vcmamba_jax.convert.export.export_onnx``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax import convert, serving
from vcmamba_jax.convert import export as export_lib
from vcmamba_jax.data import device_ops, transforms

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def check(model, variables, directory: str, batch_sizes: Sequence[int] = (1, 3)) -> float:
  """Max |exported - model| logits over random crops at each batch size (CPU or the device)."""
  exported = serving.load_exported(directory)
  size = model.img_size
  images = np.random.default_rng(0).integers(0, 256, (max(batch_sizes), size, size, 3), np.uint8)
  reference = jax.jit(
    lambda v, x: model.apply(v, device_ops.normalize(x, model.dtype), train=False)[0]
  )
  want = np.asarray(reference(variables, images), np.float32)
  worst = 0.0
  for batch in batch_sizes:
    worst = max(worst, float(np.abs(exported(images[:batch]) - want[:batch]).max()))
  return worst


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description='Export a VCMamba eval forward as a portable jax.export artifact.'
  )
  parser.add_argument(
    '--weights',
    required=True,
    help="'hf-hub:owner/repo[/file]', an exported model directory or a PyTorch file",
  )
  parser.add_argument('--output', required=True, help='export directory to write')
  parser.add_argument('--model', default=None, help='variant (checked; detected when omitted)')
  parser.add_argument('--img_size', type=int, default=None, help='input size (default: weights)')
  parser.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
  parser.add_argument(
    '--platforms',
    default=','.join(export_lib.DEFAULT_PLATFORMS),
    help='comma-separated jax.export platforms: cpu, cuda, rocm, tpu',
  )
  parser.add_argument('--crop_pct', type=float, default=transforms.DEFAULT_CROP_PCT)
  parser.add_argument(
    '--check', action='store_true', help='reload the export and compare logits with the model'
  )
  parser.add_argument(
    '--onnx',
    default=None,
    metavar='FILE',
    help='also write an ONNX model (needs `pip install jax2onnx onnxruntime`, not a dependency)',
  )
  args = parser.parse_args(argv)
  try:
    args.platforms = serving.platforms_list(args.platforms)
  except ValueError as e:
    parser.error(str(e))
  if args.img_size is not None and args.img_size < 32:
    parser.error(f'--img_size must be at least 32, got {args.img_size}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  overrides = {'dtype': DTYPES[args.dtype]}
  if args.img_size:
    overrides['img_size'] = args.img_size
  start = time.perf_counter()
  log(f'loading {args.weights} ...')
  try:
    model, variables = convert.load_pretrained(args.weights, args.model, **overrides)
  except (convert.CheckpointError, OSError, ImportError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  log(
    f'loaded in {time.perf_counter() - start:.1f} s: {model.num_classes} classes at '
    f'{model.img_size} px, {args.dtype}'
  )
  directory = export_lib.export_model(
    model,
    variables,
    args.output,
    platforms=args.platforms,
    crop_pct=args.crop_pct,
    source=args.weights,
    log=log,
  )
  if args.check:
    if serving.current_platform() not in args.platforms:
      log(f'--check skipped: this machine ({serving.current_platform()}) is not in --platforms')
    else:
      log('checking: loading the export and comparing logits at batch sizes 1 and 3 ...')
      error = check(model, variables, directory)
      log(f'max |exported - model| logits: {error:.2e}')
      if not error <= (1e-4 if args.dtype == 'float32' else 5e-2):
        print(f'error: the exported logits differ from the model by {error}', file=sys.stderr)
        return 1
  if args.onnx:
    try:
      export_lib.export_onnx(model, variables, args.onnx, log=log)
    except ImportError as e:
      print(f'error: {e}', file=sys.stderr)
      return 1
  print(directory)
  return 0


if __name__ == '__main__':
  sys.exit(main())
