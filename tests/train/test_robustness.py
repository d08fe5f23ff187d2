"""Nothing lost, nothing silent: damaged checkpoints, the workdir lock, a resume with a changed
config, signals during an asynchronous save, a failing disk, config mistakes, killed parents
of grain workers. Each drives the production program (`train.run` / main.py) and compares the
numbers with the shared uninterrupted reference run."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.train.smoke import NUM_TRAIN_STEPS, smoke_config
from vcmamba_jax import checkpoint, train
from vcmamba_jax.train import validate
from vcmamba_jax.train import workdir as workdir_lib
from vcmamba_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KEYS = ('train/loss', 'train/grad_norm', 'train/param_norm', 'train/lr')


def _train_rows(workdir: str) -> dict[int, dict]:
  rows = [row for row in read_metrics(workdir) if 'train/loss' in row]
  steps = [row['step'] for row in rows]
  assert len(steps) == len(set(steps)), f'a step was logged twice: {steps}'
  return {row['step']: row for row in rows}


def _assert_same_losses(workdir: str, reference: str, steps) -> None:
  got, want = _train_rows(workdir), _train_rows(reference)
  for step in steps:
    for key in KEYS:
      assert got[step][key] == want[step][key], (step, key, got[step][key], want[step][key])


def _copy_run(reference: str, target: str) -> str:
  shutil.copytree(reference, target)
  os.remove(os.path.join(target, workdir_lib.LOCK_FILE))
  return target


def _messages(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records]


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints.
# ------------------------------------------------------------------------------------------------


def _largest_file(directory: str) -> str:
  files = [os.path.join(r, n) for r, _, names in os.walk(directory) for n in names]
  return max(files, key=os.path.getsize)


def test_resume_after_sigterm_falls_back_over_damaged_steps_with_identical_losses(
  sigterm_run, reference_run, imagenet_dir, tmp_path, caplog
):
  """The run that got SIGTERM while step 4 was being saved left steps 4 and 5. Step 5 and three
  copies of it (6-8) are damaged, each differently. Resuming names each damage in one line,
  falls back to step 4 (the save that was in flight at the signal) and repeats the reference's
  losses from there: steps 5-8 and the final eval, each logged once."""
  workdir = _copy_run(sigterm_run[0], str(tmp_path / 'run'))
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  for step in (6, 7, 8):
    shutil.copytree(os.path.join(ckpt_dir, '5'), os.path.join(ckpt_dir, str(step)))
  assert checkpoint.verify_step(os.path.join(ckpt_dir, '8')) is None  # intact copies
  # 8: a data file cut short (a full disk, a killed copy).
  data_file = _largest_file(os.path.join(ckpt_dir, '8', 'state'))
  with open(data_file, 'r+b') as f:
    f.truncate(os.path.getsize(data_file) // 2)
  # 7: orbax's OCDBT manifest cut short.
  manifest = os.path.join(ckpt_dir, '7', 'state', 'manifest.ocdbt')
  with open(manifest, 'r+b') as f:
    f.truncate(os.path.getsize(manifest) - 16)
  # 6: 64 flipped bytes in the middle of a data file (silent bit rot): same size.
  data_file = _largest_file(os.path.join(ckpt_dir, '6', 'state'))
  with open(data_file, 'r+b') as f:
    f.seek(os.path.getsize(data_file) // 2)
    chunk = f.read(64)
    f.seek(-64, os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))
  # 5: a metadata file deleted.
  os.remove(os.path.join(ckpt_dir, '5', 'state', '_METADATA'))

  caplog.set_level(logging.INFO)
  # keep_checkpoints is a harmless change: logged, not refused.
  result = train.run(smoke_config(imagenet_dir, keep_checkpoints=5), workdir)
  assert not result.get('preempted')

  notices = [m for m in _messages(caplog) if 'is damaged' in m]
  assert len(notices) == 4, notices
  assert all('\n' not in m and 'falling back to the previous step' in m for m in notices)
  by_step = {int(m.split('Checkpoint step ')[1].split()[0]): m for m in notices}
  assert 'bytes' in by_step[8] and 'truncated' in by_step[8]
  assert 'manifest.ocdbt is' in by_step[7] and 'truncated' in by_step[7]
  assert 'sha256 mismatch' in by_step[6]
  assert '_METADATA is missing' in by_step[5]
  assert any('Resumed from' in m and m.endswith('/4.') for m in _messages(caplog))
  assert any('keep_checkpoints: 3 -> 5' in m for m in _messages(caplog))

  _assert_same_losses(workdir, reference_run, range(1, NUM_TRAIN_STEPS + 1))
  rows = read_metrics(workdir)  # every step once: step 5 of the interrupted attempt dropped
  assert sorted(r['step'] for r in rows if 'train/loss' in r) == list(range(1, 9))
  assert [r['step'] for r in rows if 'eval/top1' in r] == [8]
  assert sorted(os.listdir(ckpt_dir)) == ['4', '8']
  assert len(os.listdir(os.path.join(workdir, checkpoint.DAMAGED_DIR))) == 4
  assert checkpoint.verify_step(os.path.join(ckpt_dir, '8')) is None
  # Every start's config is kept: the interrupted run's and this one.
  assert os.path.exists(os.path.join(workdir, 'config.0.json'))
  assert os.path.exists(os.path.join(workdir, 'config.1.json'))
  _assert_tensorboard_steps_once(workdir)


def _assert_tensorboard_steps_once(workdir: str) -> None:
  from tensorboard.backend.event_processing import event_accumulator

  acc = event_accumulator.EventAccumulator(workdir, purge_orphaned_data=True)
  acc.Reload()
  steps = [e.step for e in acc.Scalars('train/loss')]
  assert steps == list(range(1, NUM_TRAIN_STEPS + 1)), steps


# ------------------------------------------------------------------------------------------------
# Resume with a changed config; config mistakes.
# ------------------------------------------------------------------------------------------------


def _fake_resumable_workdir(reference_run: str, target: str) -> str:
  """A workdir that looks resumable (its config and a step directory) without the weights."""
  os.makedirs(os.path.join(target, 'checkpoints', '4', 'state'))
  shutil.copy(os.path.join(reference_run, 'config.json'), target)
  return target


def test_a_changed_global_batch_is_refused_with_the_diff(reference_run, imagenet_dir, tmp_path):
  workdir = _fake_resumable_workdir(reference_run, str(tmp_path / 'run'))
  before = os.listdir(workdir)
  config = smoke_config(imagenet_dir, global_batch_size=64, **{'optimizer.base_lr': 0.02})
  with pytest.raises(workdir_lib.ResumeConfigError) as error:
    train.run(config, workdir)
  message = str(error.value)
  assert 'global_batch_size: 32 -> 64' in message and '--config.force_resume=True' in message
  assert 'base_lr' not in message  # a harmless change is only logged
  assert '\n' not in message
  assert set(os.listdir(workdir)) - set(before) <= {'.lock'}  # no config.<n>.json, no metrics
  workdir_lib.WorkdirLock(workdir).acquire().release()


@pytest.mark.parametrize(
  ('override', 'expected'),
  [
    ({'keep_checkpoints': 0}, 'config.keep_checkpoints=0 must be an integer >= 1'),
    ({'checkpoint_every_steps': 0}, 'config.checkpoint_every_steps=0 must be an integer >= 1'),
    ({'log_every_steps': -1}, 'config.log_every_steps=-1 must be an integer >= 1'),
    ({'model.dtype': 'float16'}, "config.model.dtype='float16' must be one of 'float32', 'bf"),
    ({'data.data_dir': '/no_such_dir/tfds'}, "config.data.data_dir='/no_such_dir/tfds' does not"),
    ({'mode': 'predict'}, "config.mode='predict' must be one of 'train', 'eval'"),
    ({'model.name': 'vcmamba_xl'}, "config.model.name='vcmamba_xl' must be one of"),
    ({'init_from': '/no/such.pth'}, "config.init_from='/no/such.pth' must be an existing"),
  ],
)
def test_config_mistakes_end_in_one_line_before_any_file(
  imagenet_dir, tmp_path, override, expected
):
  workdir = str(tmp_path / 'run')
  with pytest.raises(validate.ConfigError) as error:
    train.run(smoke_config(imagenet_dir, **override), workdir)
  assert expected in str(error.value) and '\n' not in str(error.value)
  assert not os.path.exists(workdir)
  assert not os.path.exists('/no_such_dir')


def test_main_prints_a_config_mistake_in_one_line_and_exits_2(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
    [
      sys.executable,
      'main.py',
      '--config=vcmamba_jax/configs/digits.py:smoke',
      f'--workdir={workdir}',
      '--config.checkpoint_every_steps=0',
      '--config.model.dtype=float16',
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    check=False,
  )
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
  assert 'config.checkpoint_every_steps=0' in lines[0] and "model.dtype='float16'" in lines[0]
  assert not workdir.exists()


# ------------------------------------------------------------------------------------------------
# Signals while an asynchronous save is in flight; a failing disk.
# ------------------------------------------------------------------------------------------------


class _SlowStorage:
  """Hooks that make 'a signal while an asynchronous save is in flight' deterministic: while the
  files of `step` are being committed (background thread), `storage` sends `signum` to this
  process and keeps the save in flight for `seconds`; `after_step` holds the training thread
  after the next step until that has happened (on a busy machine the background write can
  otherwise lag several steps behind)."""

  def __init__(self, step: int, signum: int, seconds: float = 1.0):
    self.step, self.signum, self.seconds = step, signum, seconds
    self.in_flight_dir = None
    self.result = None  # what train.run returned
    self._sent = threading.Event()

  def storage(self, step: int, step_dir: str) -> None:
    if step == self.step:
      self.in_flight_dir = step_dir
      os.kill(os.getpid(), self.signum)
      self._sent.set()
      time.sleep(self.seconds)

  def after_step(self, step: int) -> None:
    if step == self.step + 1:
      assert self._sent.wait(timeout=120)
      time.sleep(0.1)  # the handler runs in this (the main) thread

  def hooks(self) -> train.Hooks:
    return train.Hooks(storage=self.storage, after_step=self.after_step)


def _interrupt_during_save(imagenet_dir: str, workdir: str, signum: int) -> _SlowStorage:
  storage = _SlowStorage(step=4, signum=signum)
  handler_before = signal.getsignal(signum)
  storage.result = train.run(smoke_config(imagenet_dir), workdir, hooks=storage.hooks())
  assert signal.getsignal(signum) == handler_before  # the run restored the handler
  return storage


@pytest.fixture(scope='module')
def sigterm_run(imagenet_dir, tmp_path_factory) -> tuple[str, _SlowStorage]:
  """A run that got SIGTERM while the asynchronous save of step 4 was in flight."""
  workdir = str(tmp_path_factory.mktemp('sigterm'))
  return workdir, _interrupt_during_save(imagenet_dir, workdir, signal.SIGTERM)


def _assert_finished_the_save_and_saved_the_current_step(workdir, storage, reference_run):
  assert storage.result['preempted']
  assert storage.in_flight_dir is not None  # the signal came while step 4 was being written
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpt_dir)) == ['4', '5']  # the save in flight, then the current step
  for step in ('4', '5'):
    assert checkpoint.verify_step(os.path.join(ckpt_dir, step)) is None
  assert max(_train_rows(workdir)) == 5
  _assert_same_losses(workdir, reference_run, range(1, 6))


def test_sigterm_during_an_async_save_finishes_it_and_saves_the_current_step(
  sigterm_run, reference_run
):
  _assert_finished_the_save_and_saved_the_current_step(*sigterm_run, reference_run)
  # Resuming it: test_resume_after_sigterm_falls_back_over_damaged_steps_with_identical_losses.


def test_sigint_during_an_async_save_finishes_it_and_saves_the_current_step(
  reference_run, imagenet_dir, tmp_path
):
  workdir = str(tmp_path / 'run')
  storage = _interrupt_during_save(imagenet_dir, workdir, signal.SIGINT)
  _assert_finished_the_save_and_saved_the_current_step(workdir, storage, reference_run)


def test_a_failed_background_save_stops_the_run_within_a_step(imagenet_dir, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  failed = threading.Event()

  def full_disk(step: int, step_dir: str) -> None:
    if step == 4:
      failed.set()
      raise OSError(errno.ENOSPC, 'No space left on device', step_dir)

  def after_step(step: int) -> None:
    if step == 5:  # deterministic: the save of step 4 has failed by the end of step 5
      assert failed.wait(timeout=120)
      time.sleep(0.5)

  hooks = train.Hooks(storage=full_disk, after_step=after_step)
  with pytest.raises(checkpoint.CheckpointSaveError) as error:
    train.run(smoke_config(imagenet_dir), workdir, hooks=hooks)
  message = str(error.value)
  assert '\n' not in message, message
  assert os.path.join(workdir, 'checkpoints', '4') in message
  assert 'No space left on device' in message and 'last complete checkpoint is none' in message
  assert max(_train_rows(workdir)) == 5  # stopped before step 6
  assert not os.path.exists(os.path.join(workdir, 'checkpoints', '4'))
  assert not [r for r in caplog.records if r.exc_info]  # no library tracebacks
  workdir_lib.WorkdirLock(workdir).acquire().release()  # released on the error


# ------------------------------------------------------------------------------------------------
# main.py in subprocesses: the lock, the preemption exit code, kill -9 and grain workers.
# ------------------------------------------------------------------------------------------------


def _main_command(imagenet_dir: str, workdir: str) -> list[str]:
  return [
    sys.executable,
    'main.py',
    '--config=vcmamba_jax/configs/vcmamba_s.py:smoke',
    f'--workdir={workdir}',
    '--config.data.dataset=imagenet2012',
    f'--config.data.data_dir={imagenet_dir}',
    '--config.model.num_classes=1000',
    '--config.num_train_steps=200',  # never reached: the tests stop it
    '--config.checkpoint_every_steps=100',
    '--config.log_every_steps=1',
    '--config.data.num_workers=1',
  ]


def _children(pid: int) -> list[int]:
  found = []
  for entry in os.listdir('/proc'):
    if entry.isdigit():
      try:
        with open(f'/proc/{entry}/stat') as f:
          fields = f.read().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid and fields[0] != 'Z':
        found.append(int(entry))
  return found


def _alive(pid: int) -> bool:
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except OSError:
    return False


def _start_and_wait_for_training(command: list[str]) -> tuple[subprocess.Popen, list[str]]:
  proc = subprocess.Popen(
    command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  lines, steps_logged = [], 0
  for line in proc.stdout:
    lines.append(line)
    steps_logged += '/200 | epoch' in line
    if steps_logged == 2:  # past the first (compiling) step: workers run, the lock is held
      return proc, lines
  proc.kill()
  proc.wait()
  raise AssertionError(''.join(lines[-50:]))


def _drain(proc: subprocess.Popen, lines: list[str]) -> threading.Thread:
  thread = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
  thread.start()
  return thread


def test_a_second_run_on_a_locked_workdir_fails_at_once(imagenet_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lib.WorkdirLock(workdir):  # as a live run holds it
    started = time.monotonic()
    with pytest.raises(
      workdir_lib.WorkdirLockedError, match=f'in use by another run \\(pid {os.getpid()} on'
    ):
      train.run(smoke_config(imagenet_dir), workdir)
    assert time.monotonic() - started < 10
  assert os.listdir(workdir) == ['.lock']  # the refused run wrote nothing


def test_main_exits_with_the_preemption_code_on_ctrl_c(imagenet_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  proc, lines = _start_and_wait_for_training(_main_command(imagenet_dir, workdir))
  try:
    drain = _drain(proc, lines)
    workers = _children(proc.pid)
    assert workers, 'expected a grain worker process'
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == checkpoint.EXIT_PREEMPTED, ''.join(lines[-30:])
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  drain.join(timeout=10)
  log = ''.join(lines)
  assert 'SIGINT received' in log and 'Preempted: saved step' in log
  saved = int(log.split('Preempted: saved step ')[1].split()[0])
  assert checkpoint.verify_step(os.path.join(workdir, 'checkpoints', str(saved))) is None
  assert max(_train_rows(workdir)) == saved
  time.sleep(1)
  assert not any(_alive(w) for w in workers)


# A process as a training run is at its start: it holds the workdir lock, watches for signals
# and reads the production input pipeline with one grain worker process.
_PIPELINE_PROCESS = """
import sys
from vcmamba_jax import checkpoint, data
from vcmamba_jax.train import workdir
source = data.get_source('imagenet2012', 'train', sys.argv[1])
lock = workdir.WorkdirLock(sys.argv[2]).acquire()
with checkpoint.PreemptionWatcher():
  iterator = iter(data.create_train_dataset(
    source=source, global_batch_size=8, image_size=32, num_workers=1,
    process_index=0, process_count=1))
  next(iterator)
  print('ready', flush=True)
  sys.stdin.read()  # until killed
"""


def _start_pipeline_process(imagenet_dir: str, workdir: str) -> subprocess.Popen:
  proc = subprocess.Popen(
    [sys.executable, '-c', _PIPELINE_PROCESS, imagenet_dir, workdir],
    cwd=REPO,
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
  )
  assert proc.stdout.readline().strip() == 'ready'
  return proc


def _wait_until_gone(pids: list[int], seconds: float = 10) -> bool:
  deadline = time.monotonic() + seconds
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.2)
  return not any(_alive(p) for p in pids)


def test_kill_9_leaves_no_grain_worker_and_a_recoverable_lock(imagenet_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  proc = _start_pipeline_process(imagenet_dir, workdir)
  workers = _children(proc.pid)
  assert workers, 'expected a grain worker process'
  proc.kill()
  proc.wait()
  assert _wait_until_gone(workers), 'a grain worker outlived its killed parent'
  lock = workdir_lib.WorkdirLock(workdir).acquire()  # the crashed run's lock is stale
  assert lock.recovered_from is not None and f'pid {proc.pid}' in lock.recovered_from
  lock.release()


def test_a_second_ctrl_c_exits_at_once_without_saving(imagenet_dir, tmp_path):
  proc = _start_pipeline_process(imagenet_dir, str(tmp_path / 'run'))
  workers = _children(proc.pid)
  proc.send_signal(signal.SIGINT)  # the first: 'finish the save, save, exit' (a flag)
  time.sleep(0.5)
  assert proc.poll() is None
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=10) == checkpoint.EXIT_INTERRUPTED
  assert _wait_until_gone(workers)


@pytest.mark.parametrize(
  ('key', 'value'),
  [
    ('model.scan_impl', 'chunked'),  # the non-Pallas TPU scan README documents
    ('model.scan_impl', 'pallas_tpu'),
    ('model.depthwise_impl', 'pallas'),
  ],
)
def test_every_model_implementation_passes_config_validation(imagenet_dir, key, value):
  # The valid choices come from the model's own lists, so a new implementation cannot be
  # rejected by the config check (it was for 'chunked' and 'pallas_tpu' before).
  validate.validate_config(smoke_config(imagenet_dir, **{key: value}))
  with pytest.raises(validate.ConfigError, match=f"{key}='nope' must be one of"):
    validate.validate_config(smoke_config(imagenet_dir, **{key: 'nope'}))
