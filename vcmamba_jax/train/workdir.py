"""The guarded workdir: one run at a time, and a resume that knows what changed.

- `WorkdirLock`: `flock` on `WORKDIR/.lock`, held for the whole run. A second run on the same
  workdir fails at once with the owner's pid, host and start time. The kernel drops the lock
  when its process dies, however it dies (kill -9, OOM, a crashed host's NFS lease), so a lock
  file left behind by a crash is recognised as stale and taken over.
- Config history: every start writes `config.<n>.json` (n = 0, 1, ...; never overwritten) and
  `config.json` (the latest).
- `check_resume_config`: compares the stored config of a run being resumed with the new one.
  Changes that break an exact resume (seed, global batch, model, data stream, augmentation,
  EMA) are refused with the diff unless `config.force_resume=True`; other changes are logged.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from collections.abc import Mapping
from typing import Any

from absl import logging
from ml_collections import ConfigDict

LOCK_FILE = '.lock'
CONFIG_FILE = 'config.json'

# Fields whose change makes the resumed run differ from an uninterrupted one, or that change the
# structure of the saved state / data iterator. Prefixes match whole subtrees.
BREAKS_RESUME = (
  'seed',
  'global_batch_size',
  'model.',
  'data.dataset',
  'data.image_folder',
  'data.train_split',
  'data.rrc_scale',
  'data.hflip_prob',
  'data.randaugment',
  'data.interpolation',
  'data.repeated_aug',
  'data.num_workers',  # the grain iterator state is per worker
  'aug.',
  'ema_decay',
)
# Never compared: bookkeeping of this start.
IGNORED = ('force_resume', 'mode')


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir."""


class ResumeConfigError(ValueError):
  """The config of a resumed run changed fields that break an exact resume."""


def _describe_owner(content: str) -> str:
  try:
    owner = json.loads(content)
    return f'pid {owner["pid"]} on {owner["host"]}, started {owner["started"]}'
  except (ValueError, KeyError, TypeError):
    return 'an unknown process'


class WorkdirLock:
  """Exclusive lock of a workdir for the lifetime of a run (a context manager).

  Only one process of a multi-process job should take it (process 0); the others share the run.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None
    self.recovered_from: str | None = None  # owner description of a stale lock taken over

  def acquire(self) -> WorkdirLock:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      content = os.pread(fd, 4096, 0).decode(errors='replace')
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise
      raise WorkdirLockedError(
        f'{os.path.dirname(self.path)} is in use by another run ({_describe_owner(content)}). '
        'Wait for it to finish or stop it, or pass another --workdir.'
      ) from None
    previous = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    if previous:
      # The lock file outlived its owner: a run that crashed or was killed (kill -9, OOM).
      self.recovered_from = _describe_owner(previous)
      logging.warning(
        'Took over the stale lock of %s (that run ended without releasing it, e.g. kill -9).',
        self.recovered_from,
      )
    owner = {
      'pid': os.getpid(),
      'host': socket.gethostname(),
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # an empty lock file = released cleanly
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()


# ------------------------------------------------------------------------------------------------
# Config history and the resume check.
# ------------------------------------------------------------------------------------------------


def _flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = list(value) if isinstance(value, tuple) else value
  return flat


def config_to_dict(config: ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def stored_config(workdir: str) -> dict[str, Any] | None:
  """The config of the previous start in `workdir` (None if there was none)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_config_history(config: ConfigDict, workdir: str) -> str:
  """Writes `config.<n>.json` (the first free n) and `config.json`; returns the former's path."""
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  n = 0
  while os.path.exists(os.path.join(workdir, f'config.{n}.json')):
    n += 1
  numbered = os.path.join(workdir, f'config.{n}.json')
  for path in (numbered, os.path.join(workdir, CONFIG_FILE)):
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  return numbered


def _breaks_resume(key: str) -> bool:
  return any(key == p or (p.endswith('.') and key.startswith(p)) for p in BREAKS_RESUME)


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old value, new value)} of the fields that differ ('<absent>' if missing)."""
  a, b = _flatten(old), _flatten(new)
  absent = '<absent>'
  return {
    k: (a.get(k, absent), b.get(k, absent))
    for k in sorted(set(a) | set(b))
    if a.get(k, absent) != b.get(k, absent) and k not in IGNORED
  }


def check_resume_config(old: Mapping[str, Any], config: ConfigDict) -> None:
  """Logs every changed field; raises ResumeConfigError for those that break an exact resume."""
  diff = config_diff(old, config_to_dict(config))
  if not diff:
    return
  breaking = {k: v for k, v in diff.items() if _breaks_resume(k)}
  harmless = {k: v for k, v in diff.items() if k not in breaking}
  show = lambda d: ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in d.items())
  if harmless:
    logging.warning('Resuming with changed settings: %s.', show(harmless))
  if not breaking:
    return
  if config.get('force_resume', False):
    logging.warning(
      'Resuming with changes that break an exact resume (force_resume=True): %s.', show(breaking)
    )
    return
  raise ResumeConfigError(
    f'refusing to resume: {show(breaking)} changed since the checkpoints in this workdir were '
    'written, so the run would not continue the same training. Use the original values, a new '
    '--workdir, or pass --config.force_resume=True to resume anyway.'
  )
