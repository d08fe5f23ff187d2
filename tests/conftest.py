"""Test-wide setup, before anything initialises a JAX backend.

- 8 simulated CPU devices, so that sharding and multi-device code paths run on a laptop.
- A persistent XLA compilation cache: tests that build the same program (every training run of
  tests/train uses the same smoke config) compile it once per machine instead of once per run.
  Set JAX_COMPILATION_CACHE_DIR to move it; the cache only ever replays identical programs.
"""

import os
import tempfile

from xdist.scheduler import LoadScopeScheduling

_DEVICE_FLAG = '--xla_force_host_platform_device_count'
if _DEVICE_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_DEVICE_FLAG}=8'.strip()
# No test reaches the network: huggingface_hub reads these when it is first imported (some of its
# code consults the import-time constants rather than the environment), so set them before it is.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_HUB_DISABLE_TELEMETRY', '1')
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), 'vcmamba_jax_test_xla_cache')
)


# ------------------------------------------------------------------------------------------------
# Parallel runs (pytest-xdist, `-n auto --dist loadscope` in pyproject.toml): a test module is
# the unit of work, so that its module fixtures (a training run, a TPU compile) are built once.
# Modules that share an expensive session fixture form one unit, and the longest units start
# first (longest-processing-time-first: the last unit to start is then a short one).
# ------------------------------------------------------------------------------------------------

# Modules sharing `reference_run` (tests/train/conftest.py: a whole smoke training run).
_SHARED = {
  'tests/train/test_trainer.py': 'reference_run',
  'tests/train/test_robustness.py': 'reference_run',
  'tests/train/test_init_from.py': 'reference_run',
}
# The longest units, longest first (seconds of a cold run on 2 cores, 2026-12-06); the others
# keep their collection order after them.
_LONGEST_FIRST = (
  'reference_run',
  'tests/train/test_distillation.py',
  'tests/segmentation/test_train.py',
  'tests/train/test_sharding.py',
  'tests/tpu/test_aot.py',
  'tests/train/test_finetune.py',
  'tests/segmentation/test_golden.py',
  'tests/models/test_golden.py',
  'tests/models/test_scan.py',
  'tests/tpu/test_scan_tpu.py',
)


def _unit(nodeid: str) -> str:
  module = nodeid.split('::')[0]
  return _SHARED.get(module, module)


class _ModuleUnits(LoadScopeScheduling):
  """xdist's scope scheduling with `_unit` as the scope (its own is the module or class)."""

  def _split_scope(self, nodeid: str) -> str:
    return _unit(nodeid)


def pytest_xdist_make_scheduler(config, log):
  return _ModuleUnits(config, log)


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most 4 (each compiles on one core and holds a few GB;
  more workers would build the shared fixtures more often than they save)."""
  return max(1, min(4, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(_unit(item.nodeid), len(rank)))  # stable: module order kept
