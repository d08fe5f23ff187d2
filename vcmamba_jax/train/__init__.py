"""Training and evaluation: the loop, train state, steps, schedule/optimizer and metrics."""

from vcmamba_jax.train.hooks import Hooks
from vcmamba_jax.train.trainer import (
  TrainingDivergedError,
  evaluate,
  run,
  train_and_evaluate,
)

__all__ = [
  'Hooks',
  'TrainingDivergedError',
  'evaluate',
  'run',
  'train_and_evaluate',
]
