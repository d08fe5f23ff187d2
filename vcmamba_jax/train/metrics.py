"""What the user sees: metrics.jsonl, TensorBoard events and the console progress line.

Only process 0 writes. TensorBoard events are written with tensorboard's own event writer and
protos, so neither TensorFlow nor clu.metric_writers is needed.
"""

from __future__ import annotations

import json
import logging as std_logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging
from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
  """Appends `{"step": s, "<name>": value, ...}` lines to `workdir/metrics.jsonl` and scalar
  summaries to TensorBoard event files in `workdir` (`tensorboard --logdir=<workdir>`).

  `resume_step`: the step a training run (re)starts from (0 for a fresh start). Rows of later
  steps, written by an earlier attempt that died before its next checkpoint, are dropped from
  metrics.jsonl, and TensorBoard is told to purge them (a SessionLog START event), so every
  step appears once.
  """

  def __init__(self, workdir: str, enabled: bool | None = None, resume_step: int | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._events = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, METRICS_FILE)
      if resume_step is not None:
        _drop_rows_after(path, resume_step)
      self._jsonl = open(path, 'a')  # noqa: SIM115 (run-long)
      self._events = EventFileWriter(workdir)
      if resume_step is not None:
        # TensorBoard drops the events of steps >= this one written before it (orphaned data).
        self._events.add_event(
          event_pb2.Event(
            wall_time=time.time(),
            step=int(resume_step) + 1,
            session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START),
          )
        )

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes scalar `metrics` at `step` (non-numbers are skipped for TensorBoard)."""
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    values = [
      summary_pb2.Summary.Value(tag=k, simple_value=float(v))
      for k, v in row.items()
      if k != 'step' and isinstance(v, (int, float))
    ]
    self._events.add_event(
      event_pb2.Event(
        wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)
      )
    )
    self._events.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._events.close()
      self.enabled = False


def _drop_rows_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      row_step = json.loads(line)['step']
    except (ValueError, KeyError, TypeError):
      continue  # a line cut short by a crash
    if row_step <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if len(kept) == len(lines):
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.writelines(kept)
  os.replace(tmp, path)
  logging.info(
    '%s: dropped %d rows past step %d (they are redone after the resume).',
    path,
    len(lines) - len(kept),
    step,
  )


def _to_python(value: Any) -> Any:
  if hasattr(value, 'item'):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no nan/inf; keep them readable ("nan", "inf")
  return value


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The rows of `workdir/metrics.jsonl` (for notebooks and tests)."""
  with open(os.path.join(workdir, METRICS_FILE)) as f:
    return [json.loads(line) for line in f if line.strip()]


class Chrono:
  """Training throughput, excluding compilation and paused sections (evals, checkpoints).

  `start(step)` after the first (compiling) step has finished, `pause()` / `resume()` around
  non-training work, `measure(step)` at log steps (after the metrics were fetched, so the device
  work up to `step` is done) -> seconds per step since the previous measurement.
  """

  def __init__(self, total_steps: int, global_batch_size: int):
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self._last_step: int | None = None
    self._last_time = 0.0
    self._paused_at: float | None = None
    self._paused = 0.0
    self.step_time: float | None = None

  def start(self, step: int) -> None:
    self._last_step, self._last_time, self._paused = step, time.perf_counter(), 0.0

  @property
  def started(self) -> bool:
    return self._last_step is not None

  def pause(self) -> None:
    if self._paused_at is None:
      self._paused_at = time.perf_counter()

  def resume(self) -> None:
    if self._paused_at is not None:
      self._paused += time.perf_counter() - self._paused_at
      self._paused_at = None

  def measure(self, step: int) -> dict[str, float]:
    """Throughput since the last measurement: step_time, img/s, img/s per device, ETA."""
    if self._last_step is None or step <= self._last_step:
      return {}
    now = time.perf_counter()
    self.step_time = (now - self._last_time - self._paused) / (step - self._last_step)
    self._last_step, self._last_time, self._paused = step, now, 0.0
    images_per_sec = self.global_batch_size / self.step_time
    return {
      'step_time': self.step_time,
      'img_per_sec': images_per_sec,
      'img_per_sec_per_device': images_per_sec / jax.device_count(),
    }

  def eta_seconds(self, step: int) -> float | None:
    return None if self.step_time is None else self.step_time * (self.total_steps - step)


def format_duration(seconds: float | None) -> str:
  if seconds is None:
    return '?'
  seconds = int(seconds)
  hours, rest = divmod(seconds, 3600)
  return f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours else f'{rest // 60}:{rest % 60:02d}'


def log_progress(
  step: int, total_steps: int, epoch: float, metrics: Mapping[str, Any], eta_seconds: float | None
) -> None:
  """One console line: step/total, epoch, loss, lr, img/s, ETA."""
  parts = [f'step {step}/{total_steps}', f'epoch {epoch:.2f}']
  if 'train/loss' in metrics:
    parts.append(f'loss {metrics["train/loss"]:.4f}')
  if 'train/lr' in metrics:
    parts.append(f'lr {metrics["train/lr"]:.3g}')
  if 'train/img_per_sec' in metrics:
    parts.append(f'{metrics["train/img_per_sec"]:.1f} img/s')
  if metrics.get('train/skipped_updates'):
    parts.append(f'skipped updates {metrics["train/skipped_updates"]}')
  parts.append(f'ETA {format_duration(eta_seconds)}')
  logging.info(' | '.join(parts))


class _LibraryInfoFilter(std_logging.Filter):
  """Drops INFO/DEBUG records of chatty libraries (orbax logs ~30 lines per checkpoint)."""

  LIBRARIES = ('/orbax/', '/grain/', '/tensorflow_datasets/')
  # orbax's reports of a failed background save; the trainer reports it in one line.
  REPORTED_BY_US = ('in background save thread', 'Save Finalize thread')

  def filter(self, record: std_logging.LogRecord) -> bool:
    if not any(lib in record.pathname for lib in self.LIBRARIES):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    if not _verbose() and any(m in str(record.msg) for m in self.REPORTED_BY_US):
      return False
    if record.exc_info and not _verbose():
      # e.g. orbax logs a failed background save with pages of traceback; the trainer reports
      # it in one line (VCMAMBA_VERBOSE=1 keeps the traceback).
      record.exc_info, record.exc_text = None, None
    return True


def _verbose() -> bool:
  return os.environ.get('VCMAMBA_VERBOSE', '') not in ('', '0')


def quiet_library_logs() -> None:
  """Keeps the console to our progress lines plus library warnings and errors (idempotent)."""
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _LibraryInfoFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_LibraryInfoFilter())
