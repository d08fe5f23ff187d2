"""Training and evaluation: the loop, train state, steps, schedule/optimizer and metrics."""

from vcmamba_jax.train.trainer import (
  TrainingDivergedError,
  evaluate,
  initialize_distributed,
  run,
  train_and_evaluate,
)

__all__ = [
  'TrainingDivergedError',
  'evaluate',
  'initialize_distributed',
  'run',
  'train_and_evaluate',
]
