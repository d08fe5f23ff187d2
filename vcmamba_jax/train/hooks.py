"""Hooks into a training run, passed from outside (`train.run(config, workdir, hooks=...)`).

They let tests drive the production program into rare situations (a signal at a given moment,
slow or failing storage) without test switches inside it. Everything is optional.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Hooks:
  """Callbacks of a training run.

  Attributes:
    after_step: `fn(step)` in the training thread after step `step` was dispatched (e.g. send a
      signal to the process at a chosen step).
    edit_state: `fn(step, state) -> state or None` right after `after_step`: what it returns
      replaces the TrainState (keeping its shardings), e.g. a NaN put into a weight; None leaves
      the state as it is.
    storage: `fn(step, step_dir)` in the background checkpoint thread after the files of `step`
      are written to `step_dir` and before the step is committed: slow storage (sleep) or a
      failing one (raise OSError) for tests of saves in flight.
  """

  after_step: Callable[[int], None] | None = None
  edit_state: Callable[[int, Any], Any] | None = None
  storage: Callable[[int, str], None] | None = None
