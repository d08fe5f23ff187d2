"""Semantic segmentation: the authors' Semantic FPN (mmseg 0.29.1) with a VCMamba backbone.

    model, variables = vcmamba_jax.load_segmentation_weights('fpn_vcmamba_b.pth', 'sem_fpn_vcmamba_b')
    logits, out = model.apply(variables, images_nhwc, train=False)       # stride-4 logits
    full = slide_inference(lambda x: model.apply(variables, x)[0], images_nhwc, 512, 341, 150)

Kept apart from the classification model (``vcmamba_jax.models``), whose layers it reuses.
"""

from vcmamba_jax.segmentation.convert import (
  backbone_state_from_classification,
  init_backbone_from_classification,
  load_segmentation_weights,
  seg_torch_key,
  state_dict_to_variables,
  to_mmseg_state_dict,
  upstream_interpolate_pos_embed,
)
from vcmamba_jax.segmentation.inference import (
  slide_inference,
  slide_inference_padded,
  slide_windows,
  whole_inference,
)
from vcmamba_jax.segmentation.metrics import (
  areas_to_metrics,
  cross_entropy,
  device_areas,
  intersect_and_union,
  mean_iou,
  pixel_accuracy,
  reduce_zero_label,
)
from vcmamba_jax.segmentation.model import (
  ADE20K_NUM_CLASSES,
  FPN,
  SEG_MODELS,
  FPNHead,
  SemanticFPN,
  VCMambaBackbone,
  create_segmentation_model,
  list_segmentation_models,
)
from vcmamba_jax.segmentation.resize import resize

__all__ = [
  'ADE20K_NUM_CLASSES',
  'FPN',
  'FPNHead',
  'SEG_MODELS',
  'SemanticFPN',
  'VCMambaBackbone',
  'areas_to_metrics',
  'backbone_state_from_classification',
  'create_segmentation_model',
  'cross_entropy',
  'device_areas',
  'init_backbone_from_classification',
  'intersect_and_union',
  'list_segmentation_models',
  'load_segmentation_weights',
  'mean_iou',
  'pixel_accuracy',
  'reduce_zero_label',
  'resize',
  'seg_torch_key',
  'slide_inference',
  'slide_inference_padded',
  'slide_windows',
  'state_dict_to_variables',
  'to_mmseg_state_dict',
  'upstream_interpolate_pos_embed',
  'whole_inference',
]
