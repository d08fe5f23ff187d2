"""Two processes x 4 CPU devices, as on a 2-host cluster: SIGTERM on one host makes both save the
same step and exit cleanly; rerunning resumes and reproduces the uninterrupted 2-process run; and
2 hosts x 4 devices train like 1 host x 8 devices.

Opt-in (about 3 minutes on 2 cores; set VCMAMBA_MULTIPROCESS_TESTS=1): it compiles its own
programs in two processes and runs CPU collectives across them (gloo).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from vcmamba_jax import checkpoint
from vcmamba_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
  not os.environ.get('VCMAMBA_MULTIPROCESS_TESTS'), reason='set VCMAMBA_MULTIPROCESS_TESTS=1 (slow)'
)


_FLAGS = [
  '--config=vcmamba_jax/configs/digits.py:smoke',
  '--config.num_train_steps=6',
  '--config.log_every_steps=1',
  '--config.checkpoint_every_steps=100',
  '--config.global_batch_size=32',
  '--config.eval_batch_size=64',
]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _launch(
  workdir: str, sigterm_process: int | None = None, expected_returncode: int = 0
) -> list[str]:
  """Runs main.py as processes 0 and 1 of a 2-process job; returns their logs.

  `sigterm_process`: that process gets a SIGTERM once it logged its second step.
  """
  port = _free_port()
  flags = [*_FLAGS, f'--workdir={workdir}']
  procs = []
  for process_id in (0, 1):
    env = dict(
      os.environ,
      XLA_FLAGS='--xla_force_host_platform_device_count=4',
      JAX_COORDINATOR_ADDRESS=f'localhost:{port}',
      JAX_NUM_PROCESSES='2',
      JAX_PROCESS_ID=str(process_id),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, 'main.py', *flags],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
    )
  seen = ''
  if sigterm_process is not None:
    target = procs[sigterm_process]
    for line in target.stdout:
      seen += line
      if 'step 2/' in line:
        target.send_signal(signal.SIGTERM)
        break
  logs = [p.communicate(timeout=900)[0] for p in procs]
  if sigterm_process is not None:
    logs[sigterm_process] = seen + logs[sigterm_process]
  for p, log in zip(procs, logs):
    assert p.returncode == expected_returncode, log[-3000:]
  return logs


def _losses(workdir: str) -> dict[int, float]:
  return {r['step']: r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r}


def test_two_hosts_agree_on_the_preemption_step_and_resume(tmp_path):
  reference = str(tmp_path / 'reference')
  _launch(reference)
  workdir = str(tmp_path / 'preempted')
  logs = _launch(  # SIGTERM on host 1 only; both exit with the preemption code
    workdir, sigterm_process=1, expected_returncode=checkpoint.EXIT_PREEMPTED
  )
  steps = checkpoint.create_manager(workdir, max_to_keep=3, read_only=True).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 6, steps  # one step, agreed by both hosts
  assert all(f'Preempted: saved step {steps[0]}' in log for log in logs)
  assert max(_losses(workdir)) == steps[0]  # process 0 alone writes the metrics
  _launch(workdir)  # the same command again, on both hosts
  assert _losses(workdir) == _losses(reference)


def test_two_hosts_train_like_one_host_with_the_same_devices(tmp_path):
  """Each host reads its contiguous block of the global batch, so the global batch (rows in
  order, hence mixup partners and per-row draws) does not depend on the host count."""
  two_hosts = str(tmp_path / 'two_hosts')
  _launch(two_hosts)
  one_host = str(tmp_path / 'one_host')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(key, None)
  run = subprocess.run(
    [sys.executable, 'main.py', *_FLAGS, f'--workdir={one_host}'],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
  single, double = _losses(one_host), _losses(two_hosts)
  assert sorted(single) == sorted(double) == list(range(1, 7))
  for step in single:
    assert abs(single[step] - double[step]) <= 1e-5 * abs(single[step]), step
