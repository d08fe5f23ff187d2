r"""Classifies images with a VCMamba model: top-k ImageNet-1k classes and probabilities.

  python scripts/predict.py --model vcmamba_b --image cat.jpg   # official weights from the Hub
  python scripts/predict.py --weights hf-hub:SLDGroup/VCMamba/VCMamba-B.pth --image cat.jpg
  python scripts/predict.py --weights VCMamba-B.pth --image cat.jpg --image dog.png
  python scripts/predict.py --model vcmamba_b --weights weights/vcmamba_b --image *.jpg --topk 3
  python scripts/predict.py --weights weights/vcmamba_b --image a.jpg --dtype bfloat16 --json

``--weights`` is a Hugging Face Hub path ('hf-hub:owner/repo/file' or 'hf-hub:owner/repo' for an
uploaded save_pretrained folder; cached by huggingface_hub, HF_HUB_OFFLINE=1 reads only the
cache), an exported model directory (``scripts/convert_weights.py``) or a PyTorch file of the
authors' format (.pth/.pt/.npz/.safetensors) or one of our training runs (anything
``vcmamba_jax.load_pretrained`` reads); without it, the official weights of ``--model``.
``--model`` is otherwise needed only to check what is loaded, the variant being detected.

Preprocessing is the paper's evaluation transform: resize the shorter side to
int(img_size / crop_pct) = 256 (bicubic), centre crop 224, ImageNet mean/std. Camera photos are
first rotated upright from their EXIF orientation. Probabilities are the softmax of the averaged
logits of the two heads (the authors' eval output). ``--img_size`` defaults to the resolution the
weights were trained at; another size also runs (``pos_embed`` is resized bicubically).

The forward is jitted once per batch shape: images are classified in batches of ``--batch_size``
(the last one padded). Log lines go to stderr, predictions to stdout. An image that cannot be
read is reported and skipped; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax import convert
from vcmamba_jax.convert import registry
from vcmamba_jax.data import device_ops, transforms
from vcmamba_jax.models import vcmamba as vcmamba_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def variant_name(model: vcmamba_lib.VCMamba) -> str:
  """The registered name of the model's architecture, or 'VCMamba' for a custom one."""
  return vcmamba_lib.variant_name(model) or 'VCMamba'


def make_classifier(model: vcmamba_lib.VCMamba, topk: int):
  """Jitted ``(variables, uint8 images [B, S, S, 3]) -> (probabilities [B, k] float32,
  class indices [B, k] int32)``, best first. Normalisation runs on the device, in the
  model's compute dtype."""
  topk = min(topk, model.num_classes)

  @jax.jit
  def classify(variables: dict[str, Any], images: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, _ = model.apply(variables, device_ops.normalize(images, model.dtype), train=False)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, topk)

  return classify


def classify_images(
  model: vcmamba_lib.VCMamba,
  variables: dict[str, Any],
  images: Sequence[np.ndarray],
  *,
  topk: int = 5,
  batch_size: int = 16,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Top-k (probabilities, class indices) per image for preprocessed uint8 [S, S, 3] crops.

  Batches hold ``min(batch_size, len(images))`` images (the last one zero-padded), so one
  compilation serves every batch.
  """
  classify = make_classifier(model, topk)
  batch = max(1, min(batch_size, len(images)))
  results = []
  for start in range(0, len(images), batch):
    chunk = np.stack(images[start : start + batch])
    valid = len(chunk)
    if valid < batch:
      chunk = np.concatenate([chunk, np.zeros((batch - valid, *chunk.shape[1:]), chunk.dtype)])
    probs, indices = jax.device_get(classify(variables, chunk))
    results.extend(zip(probs[:valid], indices[:valid]))
  return results


def class_names(num_classes: int, path: str | None = None) -> list[str]:
  """Names for the model's classes: from ``path`` (one per line), the ImageNet-1k names for a
  1000-class model, else 'class <i>'."""
  if path:
    with open(path, encoding='utf-8') as f:
      names = [line.strip() for line in f if line.strip()]
    if len(names) != num_classes:
      raise ValueError(
        f'{path} has {len(names)} class names but the model has {num_classes} classes'
      )
    return names
  if num_classes == 1000:
    return transforms.imagenet_class_names()
  return [f'class {i}' for i in range(num_classes)]


def load_image(path: str, img_size: int, crop_pct: float) -> np.ndarray:
  """Reads and preprocesses one image file -> uint8 [img_size, img_size, 3]."""
  with open(path, 'rb') as f:
    data = f.read()
  return transforms.eval_preprocess(data, img_size, crop_pct)


def format_predictions(
  path: str, probs: np.ndarray, indices: np.ndarray, names: Sequence[str]
) -> str:
  """Text block for one image: the path, then '  <rank>. <probability>  <name> (<index>)'."""
  lines = [path]
  for rank, (prob, index) in enumerate(zip(probs, indices), start=1):
    lines.append(f'  {rank}. {prob:.4f}  {names[int(index)]} ({int(index)})')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description='Top-k ImageNet classes of images with a VCMamba model.',
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  parser.add_argument(
    '--weights',
    default=None,
    help="'hf-hub:owner/repo[/file][@revision]', an exported model directory, a PyTorch file "
    '(.pth/.pt/.npz/.safetensors) or a training run; default: the official weights of --model',
  )
  parser.add_argument(
    '--model',
    choices=vcmamba_lib.list_models(),
    default=None,
    help='variant (checked against the weights); detected when omitted',
  )
  parser.add_argument(
    '--image',
    action='extend',
    nargs='+',
    required=True,
    metavar='PATH',
    help='image file(s); repeat the flag or list several',
  )
  parser.add_argument('--topk', type=int, default=5, help='classes to print per image')
  parser.add_argument(
    '--img_size',
    type=int,
    default=None,
    help='crop size (default: the resolution of the weights, 224)',
  )
  parser.add_argument(
    '--crop_pct',
    type=float,
    default=transforms.DEFAULT_CROP_PCT,
    help='centre-crop fraction: the shorter side is resized to int(img_size / crop_pct)',
  )
  parser.add_argument(
    '--dtype',
    choices=sorted(DTYPES),
    default='float32',
    help='compute dtype (parameters stay float32)',
  )
  parser.add_argument('--batch_size', type=int, default=16, help='images per forward')
  parser.add_argument(
    '--class_names',
    default=None,
    help='text file with one class name per line (for non-ImageNet heads; default: '
    'class_names.txt beside --weights, which a fine-tune on an image folder writes)',
  )
  parser.add_argument(
    '--json', action='store_true', help='print one JSON object per image instead of text'
  )
  args = parser.parse_args(argv)
  if args.weights is None:
    if args.model not in registry.PRETRAINED_WEIGHTS:
      parser.error(
        f'give --weights, or --model one of {sorted(registry.PRETRAINED_WEIGHTS)} for its '
        'official weights'
      )
    args.weights = registry.pretrained_weights(args.model)
  if args.topk < 1:
    parser.error(f'--topk must be positive, got {args.topk}')
  if args.batch_size < 1:
    parser.error(f'--batch_size must be positive, got {args.batch_size}')
  if args.img_size is not None and args.img_size < 32:
    parser.error(f'--img_size must be at least 32, got {args.img_size}')
  if not 0 < args.crop_pct <= 1:
    parser.error(f'--crop_pct must be in (0, 1], got {args.crop_pct}')
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    model, variables = convert.load_pretrained(args.weights, args.model, dtype=DTYPES[args.dtype])
    # A fine-tune on an image folder leaves its class names in the workdir.
    beside = os.path.join(args.weights, 'class_names.txt')
    if args.class_names is None and os.path.isfile(beside):
      args.class_names = beside
    names = class_names(model.num_classes, args.class_names)
  except (convert.CheckpointError, OSError, ImportError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  img_size = args.img_size or model.img_size
  resize = transforms.eval_resize_size(img_size, args.crop_pct)
  print(
    f'loaded {variant_name(model)} from {args.weights}: {model.num_classes} classes, '
    f'trained at {model.img_size} px; predicting at {img_size} px (resize {resize}, '
    f'crop {img_size}), {args.dtype}',
    file=sys.stderr,
  )

  paths, crops, failed = [], [], 0
  for path in args.image:
    try:
      crops.append(load_image(path, img_size, args.crop_pct))
      paths.append(path)
    except (OSError, ValueError) as e:  # missing file, ImageDecodeError (a ValueError)
      print(f'error: cannot read image {path}: {e}', file=sys.stderr)
      failed += 1
  if crops:
    start = time.perf_counter()
    results = classify_images(model, variables, crops, topk=args.topk, batch_size=args.batch_size)
    print(
      f'classified {len(crops)} image(s) in {time.perf_counter() - start:.1f} s '
      '(incl. compilation)',
      file=sys.stderr,
    )
    for path, (probs, indices) in zip(paths, results):
      if args.json:
        top = [
          {'rank': rank, 'class': int(index), 'name': names[int(index)], 'probability': float(prob)}
          for rank, (prob, index) in enumerate(zip(probs, indices), start=1)
        ]
        print(json.dumps({'image': os.fspath(path), 'top': top}))
      else:
        print(format_predictions(path, probs, indices, names))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
