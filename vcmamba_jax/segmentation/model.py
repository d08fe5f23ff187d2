"""Semantic FPN with a VCMamba backbone (mmseg 0.29.1 ``EncoderDecoder``: backbone + FPN neck +
FPNHead), NHWC, numerically matching the authors' ADE20K model.

The backbone reuses the classification layers (``Stem``, ``Downsample``, ``Stage``) with the
segmentation backbone's differences: exact-GELU stem (upstream quirk 5), no classification
norm/heads, the four raw stage outputs (strides 4/8/16/32), and a pos_embed grid fixed by the
training crop (``img_size // 32``: 16x16 at 512). Inputs whose stride-32 grid differs from it get
a correct bicubic resize of the embedding on the fly (upstream raises instead).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.models import vcmamba as vcmamba_lib
from vcmamba_jax.models.layers import BatchNorm, Dtype, conv, dense
from vcmamba_jax.models.ops import DepthwiseImpl
from vcmamba_jax.models.options import ComputeOptions, RematMlp, ScanMode
from vcmamba_jax.segmentation.resize import resize

FPN_CHANNELS = 256
HEAD_CHANNELS = 128
FEATURE_STRIDES = (4, 8, 16, 32)
ADE20K_NUM_CLASSES = 150

# Registered names -> the backbone variant.
SEG_MODELS = {
  'sem_fpn_vcmamba_s': 'vcmamba_s',
  'sem_fpn_vcmamba_m': 'vcmamba_m',
  'sem_fpn_vcmamba_b': 'vcmamba_b',
  'sem_fpn_vcmamba_nano': 'vcmamba_nano',  # tests and smoke runs only
}


def pos_embed_grid(img_size: int) -> int:
  """Side of the segmentation backbone's pos_embed: ``resolution // 32`` as upstream."""
  if img_size < 32:
    raise ValueError(f'img_size must be at least 32, got {img_size}')
  return img_size // 32


class VCMambaBackbone(nn.Module):
  """VCMamba for dense prediction: ``__call__(images, train) -> [f1, f2, f3, f4]`` NHWC
  (strides 4/8/16/32, channels ``widths``). Variable names are those of the classifier
  (stem, downsample2..4, stage1..4), so both load from the same PyTorch keys."""

  depths: Sequence[int]
  widths: Sequence[int]
  num_mamba_layers: int = 4
  img_size: int = 512
  drop_path_rate: float = 0.0
  stem_activation: str = 'gelu'
  scan_mode: ScanMode = 'upstream'
  scan_impl: scan_lib.ScanImpl = 'auto'
  remat_scan: bool = True
  depthwise_impl: DepthwiseImpl = 'auto'
  scan_blocks: bool = False
  remat_mlp: RematMlp = 'fc2_input'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> list[jax.Array]:
    _, features = vcmamba_lib.hierarchy(
      images,
      train,
      depths=self.depths,
      widths=self.widths,
      num_mamba_layers=self.num_mamba_layers,
      drop_path_rate=self.drop_path_rate,
      pos_embed_grid=pos_embed_grid(self.img_size),
      stem_activation=self.stem_activation,
      options=ComputeOptions.of(self),
      dtype=self.dtype,
    )
    return features


class FPN(nn.Module):
  """mmseg ``FPN`` (no extra levels, no norm/activation): 1x1 lateral convs, top-down sum with
  PyTorch's legacy size-based nearest upsampling, 3x3 output convs; all convs with bias."""

  channels: int = FPN_CHANNELS
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> list[jax.Array]:
    laterals = [
      dense(
        self.channels,
        dtype=self.dtype,
        name=f'lateral_convs_{i}',
        kernel_init=nn.initializers.xavier_uniform(),
      )(x)
      for i, x in enumerate(inputs)
    ]
    for i in range(len(laterals) - 1, 0, -1):
      prev = laterals[i - 1]
      laterals[i - 1] = prev + resize(laterals[i], prev.shape[1:3], mode='nearest')
    return [
      conv(
        self.channels,
        3,
        in_features=self.channels,
        dtype=self.dtype,
        name=f'fpn_convs_{i}',
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.zeros,
      )(x)
      for i, x in enumerate(laterals)
    ]


class ConvBNReLU(nn.Module):
  """mmcv ``ConvModule`` of the scale heads: 3x3 conv (pad 1, no bias) -> BN -> ReLU."""

  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = nn.Conv(
      self.features,
      (3, 3),
      padding=((1, 1), (1, 1)),
      use_bias=False,
      dtype=self.dtype,
      param_dtype=jnp.float32,
      kernel_init=nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
      name='conv',
    )(x)
    return jax.nn.relu(BatchNorm(dtype=self.dtype, name='bn')(x, train))


class FPNHead(nn.Module):
  """mmseg ``FPNHead``: per level ``max(1, log2(stride / 4))`` x [ConvBNReLU, then (levels > 0)
  bilinear 2x upsampling to ``2 * size``]; the levels are summed after a bilinear resize (no
  antialiasing) to level 0's size; channel dropout (Dropout2d); 1x1 ``conv_seg``."""

  num_classes: int = ADE20K_NUM_CLASSES
  channels: int = HEAD_CHANNELS
  feature_strides: Sequence[int] = FEATURE_STRIDES
  dropout_ratio: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array], train: bool) -> jax.Array:
    output = None
    for i, (x, stride) in enumerate(zip(inputs, self.feature_strides)):
      head_length = max(1, int(math.log2(stride) - math.log2(self.feature_strides[0])))
      for k in range(head_length):
        x = ConvBNReLU(self.channels, dtype=self.dtype, name=f'scale_heads_{i}_{k}')(x, train)
        if stride != self.feature_strides[0]:
          x = resize(x, (2 * x.shape[1], 2 * x.shape[2]), mode='bilinear')
      if output is None:
        output = x
      else:
        output = output + resize(x, output.shape[1:3], mode='bilinear')
    if train and self.dropout_ratio > 0:
      keep = 1.0 - self.dropout_ratio
      mask_shape = (output.shape[0], 1, 1, output.shape[-1])
      mask = jax.random.bernoulli(self.make_rng('dropout'), keep, mask_shape)
      output = jnp.where(mask, output / keep, 0).astype(output.dtype)
    return dense(
      self.num_classes,
      dtype=jnp.float32,
      name='conv_seg',
      kernel_init=nn.initializers.normal(0.01),
    )(output)


class SemanticFPN(nn.Module):
  """VCMamba + FPN + FPNHead.

  ``__call__(images, train=False)`` takes float NHWC images (normalised, any size >= 32) and
  returns ``(logits, out)``: logits float32 [B, ceil(H/4), ceil(W/4), num_classes] (stride 4,
  before any resize: mmseg's ``decode_head.forward``), and ``out`` with ``features`` (the four
  backbone outputs) and ``fpn`` (the four neck outputs). Train mode needs the 'drop_path' and
  'dropout' RNG streams when the rates are > 0.
  """

  backbone: VCMambaBackbone
  num_classes: int = ADE20K_NUM_CLASSES
  fpn_channels: int = FPN_CHANNELS
  head_channels: int = HEAD_CHANNELS
  dropout_ratio: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    vcmamba_lib._check_images(images)
    features = self.backbone(images, train)
    fpn = FPN(self.fpn_channels, dtype=self.dtype, name='neck')(features)
    logits = FPNHead(
      num_classes=self.num_classes,
      channels=self.head_channels,
      dropout_ratio=self.dropout_ratio,
      dtype=self.dtype,
      name='decode_head',
    )(fpn, train)
    return logits, {'features': features, 'fpn': fpn}

  @property
  def img_size(self) -> int:
    return self.backbone.img_size


def create_segmentation_model(
  name: str,
  *,
  num_classes: int = ADE20K_NUM_CLASSES,
  img_size: int = 512,
  drop_path_rate: float = 0.0,
  dropout_ratio: float = 0.1,
  dtype: Dtype = jnp.float32,
  **backbone_kwargs,
) -> SemanticFPN:
  """Builds ``sem_fpn_vcmamba_{s,m,b}`` (``sem_fpn_vcmamba_nano`` for tests).

  Args:
    num_classes: classes of the head (150 for ADE20K).
    img_size: training crop; fixes the pos_embed grid to ``img_size // 32`` (upstream 512 -> 16).
    drop_path_rate: stochastic depth of the backbone (the authors' config: 0.2).
    dropout_ratio: channel dropout before ``conv_seg`` (mmseg: 0.1).
    dtype: compute dtype; parameters, norms and the logits stay float32.
    **backbone_kwargs: other ``VCMambaBackbone`` fields (depths, widths, num_mamba_layers,
      stem_activation, scan_mode, scan_impl, remat_scan, depthwise_impl, scan_blocks,
      remat_mlp).
  """
  if name not in SEG_MODELS:
    raise ValueError(f'unknown segmentation model {name!r}; available: {sorted(SEG_MODELS)}')
  spec = vcmamba_lib.VARIANTS[SEG_MODELS[name]]
  config = vcmamba_lib.variant_fields(spec, VCMambaBackbone, backbone_kwargs, 'segmentation model')
  if isinstance(dtype, str):
    dtype = jnp.dtype(dtype)
  backbone = VCMambaBackbone(
    img_size=img_size, drop_path_rate=drop_path_rate, dtype=dtype, **config
  )
  return SemanticFPN(
    backbone=backbone, num_classes=num_classes, dropout_ratio=dropout_ratio, dtype=dtype
  )


def list_segmentation_models() -> list[str]:
  return sorted(SEG_MODELS)
