"""Multi-host set-up: `jax.distributed.initialize()` when the job has several processes.

Used by every multi-host entry point (training, evaluation, the benchmark, ahead-of-time
compilation) before anything touches a JAX backend.
"""

from __future__ import annotations

import os

import jax
from absl import logging

MODES = ('auto', 'on', 'off')


def multi_process_environment() -> bool:
  """Whether the environment describes a job of several processes (see `initialize`)."""
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return True
  for count_var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(env.get(count_var, '1') or 1) > 1:
      return True
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  return len([h for h in hosts.split(',') if h]) > 1


def initialize(mode: str = 'auto') -> bool:
  """Calls `jax.distributed.initialize()` for multi-process jobs; a no-op on a single host.

  The coordinator and process ids come from the cluster (SLURM, Open MPI, Cloud TPU, ...) or
  from JAX_COORDINATOR_ADDRESS (host:port of process 0) + JAX_NUM_PROCESSES + JAX_PROCESS_ID.

  Args:
    mode: 'auto' (initialise when `multi_process_environment()`), 'on' or 'off'
      (`config.distributed`).

  Returns:
    Whether JAX runs distributed.
  """
  if mode not in MODES:
    raise ValueError(f"config.distributed must be 'auto', 'on' or 'off', got {mode!r}")
  if jax.distributed.is_initialized():
    return True
  if mode == 'off' or (mode == 'auto' and not multi_process_environment()):
    return False
  env = os.environ
  if env.get('JAX_NUM_PROCESSES') and env.get('JAX_PROCESS_ID'):  # explicit, e.g. hand-launched
    jax.distributed.initialize(
      num_processes=int(env['JAX_NUM_PROCESSES']), process_id=int(env['JAX_PROCESS_ID'])
    )
  else:  # cluster auto-detection: SLURM, Open MPI, Cloud TPU, Kubernetes
    jax.distributed.initialize()
  logging.info('jax.distributed: process %d of %d', jax.process_index(), jax.process_count())
  return True
