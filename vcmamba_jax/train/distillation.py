"""DeiT distillation: the knowledge-distillation terms and the frozen teacher on the mesh.

The authors trained VCMamba as DeiT trains its distilled models (DeiT's ``DistillationLoss``):

    loss = (1 - alpha) * SoftTargetCE(head, mixed targets) + alpha * KD(dist_head, teacher)

with the teacher (timm ``regnety_160``, DeiT's ``regnety_160-a5fe301d.pth``) in eval mode, fed the
very batch the student sees (normalised, erased, mixed), without gradient. ``soft`` KD is
``sum KL(softmax(t / tau) || softmax(s / tau)) * tau^2 / (batch * num_classes)`` (DeiT divides
the summed KL by the number of logits, its legacy scaling); ``hard`` KD is the cross-entropy of
the student's dist_head on the teacher's argmax. alpha 0.5 and tau 1 in the released scripts.

The teacher is loaded once per run, placed on the training mesh (replicated, or sharded over the
``fsdp`` axis with ``distillation.fsdp``) and passed to the jitted train step as an argument: it
is not part of the TrainState, so it is neither in the optimizer state nor in checkpoints. Its
source and the SHA-256 of its file go to ``WORKDIR/teacher.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import Mesh
from ml_collections import ConfigDict

from vcmamba_jax import convert
from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.models import regnet
from vcmamba_jax.train import state as state_lib

TYPES = ('none', 'soft', 'hard')
DEIT_TEACHER_URL = 'https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth'
HUB_TEACHER = 'hf-hub:timm/regnety_160.deit_in1k'
RANDOM_TEACHER = 'random'  # teacher_path for random weights: benchmarks and smoke tests only
METADATA_FILE = 'teacher.json'


# ------------------------------------------------------------------------------------------------
# The distillation terms.
# ------------------------------------------------------------------------------------------------


def soft_distillation(
  student_logits: jax.Array, teacher_logits: jax.Array, tau: float
) -> jax.Array:
  """DeiT soft KD, float32 scalar: ``F.kl_div(log_softmax(s / tau), log_softmax(t / tau),
  reduction='sum', log_target=True) * tau**2 / s.numel()``.

  Args:
    student_logits: [B, K] (the dist_head), any float dtype.
    teacher_logits: [B, K], no gradient flows into them.
    tau: temperature.
  """
  student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
  teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / tau, axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student))
  return kl * (tau * tau) / student_logits.size


def hard_distillation(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """DeiT hard KD, float32 scalar: mean cross-entropy of the student on the teacher's argmax."""
  labels = jnp.argmax(teacher_logits, axis=-1)
  log_probs = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))


# ------------------------------------------------------------------------------------------------
# The teacher.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A frozen teacher placed on the mesh.

  Attributes:
    name: the registered RegNet name (e.g. 'regnety_160').
    model: the Flax RegNet (compute dtype = distillation.dtype).
    variables: {'params', 'batch_stats'} as global float32 arrays with ``shardings``.
    shardings: NamedShardings of ``variables`` (the train step's in_shardings).
    source: where the weights came from (a path, a Hub path or 'random').
    sha256: SHA-256 of the weights file (of the seed for a random teacher).
  """

  name: str
  model: nn.Module
  variables: dict[str, Any]
  shardings: dict[str, Any]
  source: str
  sha256: str

  def metadata(self) -> dict[str, Any]:
    return {'teacher': self.name, 'source': self.source, 'sha256': self.sha256}


def distillation_type(config: ConfigDict) -> str:
  """`config.distillation.type`; 'none' for configs without a distillation section (tasks such
  as segmentation that have no teacher)."""
  section = config.get('distillation')
  return 'none' if section is None else section.type


def check_config(config: ConfigDict) -> None:
  """Raises ValueError naming the field and the fix for an invalid `config.distillation`."""
  if distillation_type(config) == 'none':
    return
  d = config.distillation
  if d.type not in TYPES:
    raise ValueError(f'config.distillation.type={d.type!r}: expected one of {TYPES}')
  if d.teacher not in regnet.VARIANTS:
    raise ValueError(
      f'config.distillation.teacher={d.teacher!r} is not a registered RegNet; use '
      f"'regnety_160' (DeiT's teacher) or one of {sorted(regnet.VARIANTS)}"
    )
  if not 0.0 <= d.alpha <= 1.0:
    raise ValueError(f'config.distillation.alpha={d.alpha} must lie in [0, 1] (DeiT: 0.5)')
  if d.tau <= 0:
    raise ValueError(f'config.distillation.tau={d.tau} must be positive (DeiT: 1.0)')
  if d.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"config.distillation.dtype={d.dtype!r}: 'float32' or 'bfloat16'")


def _missing_teacher_message(path: str) -> str:
  what = 'is not set' if not path else f'is {path!r}, which does not exist'
  return (
    f"config.distillation.type='soft'/'hard' needs the teacher's weights, but "
    f"config.distillation.teacher_path {what}. The recipe distils from DeiT's RegNetY-160: "
    f'download {DEIT_TEACHER_URL} and pass '
    "--config.distillation.teacher_path=/path/to/regnety_160-a5fe301d.pth, or take timm's "
    f'copy from the Hugging Face Hub: --config.distillation.teacher_path={HUB_TEACHER}; '
    'or train without a teacher: --config.distillation.type=none.'
  )


def resolve_teacher_path(path: str) -> str:
  """A local file for `teacher_path` (a path, or an 'hf-hub:' path through the Hub loader, which
  downloads into the Hub cache), or FileNotFoundError saying where to get DeiT's teacher and how
  to turn distillation off."""
  if convert.is_hub_path(path):
    return convert.resolve_hub_path(path)
  path = os.path.expanduser(path)
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(_missing_teacher_message(path))
  return path


def file_sha256(path: str) -> str:
  """Hex SHA-256 of a file (DeiT and timm name release files by its first 8 digits:
  regnety_160-a5fe301d.pth)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 22), b''):
      digest.update(block)
  return digest.hexdigest()


def _random_init_program(model: nn.Module):
  def init(rng):
    return model.init({'params': rng}, jnp.zeros((1, 64, 64, 3), jnp.float32), train=False)

  return init


def teacher_layout(config: ConfigDict, mesh: Mesh) -> tuple[nn.Module, Any, Any]:
  """``(model, abstract variables, shardings)`` of ``config.distillation``'s teacher on ``mesh``:
  replicated, or sharded over the fsdp axis with ``distillation.fsdp``. No FLOPs, no memory."""
  d = config.distillation
  model = regnet.create_model(d.teacher, num_classes=config.model.num_classes, dtype=d.dtype)
  abstract = jax.eval_shape(_random_init_program(model), jax.random.key(0))
  if d.fsdp:
    shardings = sharding_lib.state_shardings(mesh, abstract, config.mesh.fsdp_min_size)
  else:
    shardings = jax.tree.map(lambda _: sharding_lib.replicated(mesh), abstract)
  return model, abstract, shardings


def load_teacher(config: ConfigDict, mesh: Mesh) -> Teacher | None:
  """The frozen teacher of `config.distillation` on `mesh` (None when type is 'none').

  ``teacher_path`` 'random' initialises the teacher as timm does (seeded by config.seed), which
  is meant for benchmarks and tests: a random teacher teaches nothing.
  """
  check_config(config)
  if distillation_type(config) == 'none':
    return None
  d = config.distillation
  model, _, shardings = teacher_layout(config, mesh)
  if d.teacher_path == RANDOM_TEACHER:
    rng = jax.random.fold_in(jax.random.key(config.seed), 0x7EAC)
    variables = jax.jit(
      _random_init_program(model),
      out_shardings=shardings,
      compiler_options=state_lib._init_compiler_options(),
    )(rng)
    source = f'random (seed {config.seed})'
    sha256 = hashlib.sha256(f'{d.teacher} {source}'.encode()).hexdigest()
  else:
    path = resolve_teacher_path(d.teacher_path)
    teacher_model, host_variables = convert.load_pytorch_weights(path, d.teacher)
    if teacher_model.num_classes != config.model.num_classes:
      raise ValueError(
        f'the teacher {d.teacher_path} predicts {teacher_model.num_classes} classes but '
        f'config.model.num_classes={config.model.num_classes}: distillation needs the '
        "teacher's label set (ImageNet-1k for DeiT's). Fine-tuning on other labels: "
        '--config.distillation.type=none.'
      )
    variables = state_lib.put_variables(host_variables, shardings)
    source = d.teacher_path if convert.is_hub_path(d.teacher_path) else os.path.abspath(path)
    sha256 = file_sha256(path)
  teacher = Teacher(d.teacher, model, variables, shardings, source, sha256)
  logging.info(
    'Distillation (%s): teacher %s from %s, sha256 %s', d.type, d.teacher, source, teacher.sha256
  )
  return teacher


def record_teacher(teacher: Teacher | None, workdir: str) -> None:
  """Writes (process 0) or checks `WORKDIR/teacher.json`: a resumed run whose teacher differs
  from the one the run started with gets a warning (its losses are no longer comparable)."""
  if teacher is None or jax.process_index() != 0:
    return
  path = os.path.join(workdir, METADATA_FILE)
  meta = teacher.metadata()
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get('sha256') != meta['sha256']:
      logging.warning(
        'The teacher differs from the one this run started with (%s, sha256 %s); now %s, %s.',
        previous.get('source'),
        previous.get('sha256'),
        meta['source'],
        meta['sha256'],
      )
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    json.dump(meta, f, indent=2)
