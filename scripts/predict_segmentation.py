r"""Segments images with a Semantic-FPN VCMamba model and writes a colour-coded mask PNG next to
each image (``photo.jpg`` -> ``photo_seg.png``; ``--labels`` also writes ``photo_labels.png``
with the raw class index 0..149 per pixel, and ``--overlay`` blends the mask onto the photo).

  python scripts/predict_segmentation.py --weights fpn_vcmamba_b.pth --model sem_fpn_vcmamba_b \
      --image street.jpg
  python scripts/predict_segmentation.py --weights w.npz --model sem_fpn_vcmamba_s --image a.jpg \
      --mode whole --dtype bfloat16

``--weights``: an mmseg checkpoint of the authors (.pth, needs torch) or the same state_dict as
.npz/.safetensors (``backbone.*``, ``neck.*``, ``decode_head.*``). Preprocessing is mmseg's
ADE20K test transform (AlignResize to (2048, 512), size divisor 32, ImageNet mean/std);
``--mode slide`` (default, as the paper) runs 512x512 windows with stride 341, ``--mode whole``
the whole resized image; logits are resized to the original size before the argmax. The forward
is jitted once per resized image size. The colour of each class and its name are printed with
``--legend``; a read error on an image is reported and skipped (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import vcmamba_jax
from vcmamba_jax.data import device_ops
from vcmamba_jax.data.transforms import ImageDecodeError, decode_image
from vcmamba_jax.segmentation import ade20k, inference, transforms
from vcmamba_jax.segmentation.resize import resize

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def colourise(labels: np.ndarray) -> np.ndarray:
  """int [H, W] class indices 0..149 -> uint8 [H, W, 3] with the fixed ADE20K palette."""
  return ade20k.PALETTE[np.clip(labels, 0, ade20k.NUM_CLASSES - 1)]


def make_segmenter(model, mode: str, crop: int, stride: int):
  """Jitted ``(variables, uint8 image [1, h, w, 3], (H, W)) -> int32 [H, W] classes``."""

  def segment(variables, image, out_size):
    x = device_ops.normalize(image, model.dtype)

    def apply_fn(y):
      return model.apply(variables, y, train=False)[0]

    if mode == 'slide':
      logits = inference.slide_inference(apply_fn, x, crop, stride, model.num_classes)
    else:
      logits = inference.whole_inference(apply_fn, x)
    return jnp.argmax(resize(logits, out_size), axis=-1)[0].astype(jnp.int32)

  return jax.jit(segment, static_argnums=(2,))


def segment_image(segment, variables, image: np.ndarray, scale=(2048, 512)) -> np.ndarray:
  """uint8 [H, W, 3] -> int32 [H, W] class indices (0..149), mmseg's test transform."""
  height, width = image.shape[:2]
  size = transforms.eval_size(height, width, scale)
  resized = transforms.resize_bilinear(
    transforms.resize_bilinear(image, transforms.rescale_size(height, width, scale)), size
  )
  return np.asarray(segment(variables, resized[None], (height, width)))


def output_paths(image_path: str) -> tuple[str, str, str]:
  stem, _ = os.path.splitext(image_path)
  return f'{stem}_seg.png', f'{stem}_labels.png', f'{stem}_overlay.png'


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--weights', required=True, help='mmseg Semantic-FPN checkpoint (.pth/.npz/...)')
  p.add_argument('--model', default='sem_fpn_vcmamba_b', help='sem_fpn_vcmamba_{s,m,b}')
  p.add_argument('--image', action='append', nargs='+', required=True, help='image files')
  p.add_argument('--mode', choices=('slide', 'whole'), default='slide')
  p.add_argument('--crop', type=int, default=512)
  p.add_argument('--stride', type=int, default=341)
  p.add_argument(
    '--scale',
    type=int,
    nargs=2,
    default=(2048, 512),
    metavar=('LONG', 'SHORT'),
    help='AlignResize scale: long side <= LONG, short side <= SHORT (mmseg: 2048 512)',
  )
  p.add_argument('--dtype', choices=sorted(DTYPES), default='float32')
  p.add_argument('--labels', action='store_true', help='also write <stem>_labels.png (0..149)')
  p.add_argument('--overlay', action='store_true', help='also write <stem>_overlay.png')
  p.add_argument('--legend', action='store_true', help='print the classes found with colours')
  return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  model, variables = vcmamba_jax.load_segmentation_weights(
    args.weights, args.model, dtype=DTYPES[args.dtype]
  )
  segment = make_segmenter(model, args.mode, args.crop, args.stride)
  status = 0
  for path in [p for group in args.image for p in group]:
    try:
      with open(path, 'rb') as f:
        image = decode_image(f.read())
    except (OSError, ImageDecodeError) as e:
      print(f'cannot read image {path}: {e}', file=sys.stderr)
      status = 1
      continue
    labels = segment_image(segment, variables, image, tuple(args.scale))
    mask_path, labels_path, overlay_path = output_paths(path)
    colours = colourise(labels)
    Image.fromarray(colours).save(mask_path)
    if args.labels:
      Image.fromarray(labels.astype(np.uint8), mode='L').save(labels_path)
    if args.overlay:
      blend = (0.5 * image.astype(np.float32) + 0.5 * colours).astype(np.uint8)
      Image.fromarray(blend).save(overlay_path)
    print(f'{path} -> {mask_path}')
    if args.legend:
      values, counts = np.unique(labels, return_counts=True)
      for v, c in sorted(zip(values, counts), key=lambda t: -t[1]):
        r, g, b = ade20k.PALETTE[v]
        print(f'  {ade20k.CLASS_NAMES[v]:<20s} #{r:02x}{g:02x}{b:02x}  {c / labels.size:6.1%}')
  return status


if __name__ == '__main__':
  sys.exit(main())
