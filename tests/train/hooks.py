"""Hooks the training tests pass to the production loop (`train.run(..., hooks=train.Hooks(...))`):
faults come from outside the program, as they do in a real run."""

from __future__ import annotations

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np

from vcmamba_jax.train.hooks import Hooks
from vcmamba_jax.train.state import TrainState


def sigterm_after(step: int) -> Hooks:
  """Sends SIGTERM to this process after the update of `step`, as a preemption notice would."""

  def after_step(current: int) -> None:
    if current == step:
      os.kill(os.getpid(), signal.SIGTERM)

  return Hooks(after_step=after_step)


def _replace_head_bias(state: TrainState, value: jax.Array) -> TrainState:
  params = dict(state.params)
  params['head'] = {**params['head'], 'bias': value}
  return state.replace(params=params)


class NanParameter:
  """An `edit_state` hook (`train.Hooks(edit_state=NanParameter(...))`): puts NaN into `params/head/bias` after step `after`, so that the next update sees a NaN
  loss and NaN gradients. With `restore_after`, the original bias comes back after that step (a
  transient fault), and the hook records whether the loop left the state untouched meanwhile."""

  def __init__(self, after: int, restore_after: int | None = None):
    self.after, self.restore_after = after, restore_after
    self._original = None
    self._poisoned: TrainState | None = None
    self.state_unchanged_while_poisoned: bool | None = None

  def __call__(self, step: int, state: TrainState) -> TrainState | None:
    if step == self.after:
      bias = state.params['head']['bias']
      self._original = bias
      poisoned = jax.device_put(jnp.full(bias.shape, jnp.nan, bias.dtype), bias.sharding)
      state = _replace_head_bias(state, poisoned)
      self._poisoned = jax.device_get(state)
      return state
    if step == self.restore_after:
      # Every float leaf (weights, BN statistics, Adam moments, EMA) as before the bad updates;
      # only integer counters (step, optimizer count, skipped_updates) advanced.
      now = jax.device_get(state)
      same = [
        np.array_equal(a, b, equal_nan=True)
        for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(self._poisoned))
        if np.issubdtype(np.asarray(a).dtype, np.floating)
      ]
      self.state_unchanged_while_poisoned = bool(same) and all(same)
      return _replace_head_bias(state, self._original)
    return None
