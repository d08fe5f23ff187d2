"""Imports are cheap and side-effect free: the data package (what grain worker processes
import) pulls in neither jax nor tensorflow_datasets until a name that needs them is used, and
the datasets register when asked for. Each check runs in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HEAVY = ('jax', 'jaxlib', 'flax', 'tensorflow', 'tensorflow_datasets', 'grain', 'orbax', 'torch')


def _heavy_modules_after(code: str) -> list[str]:
  """Top-level names of HEAVY packages in sys.modules after running `code` in a new process."""
  probe = (
    f'{code}\nimport json, sys\n'
    f'print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r}))))'
  )
  result = subprocess.run(
    [sys.executable, '-c', probe], cwd=REPO, capture_output=True, text=True, check=True, timeout=300
  )
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_importing_the_data_package_and_its_host_transforms_is_light():
  assert _heavy_modules_after('import vcmamba_jax.data') == []
  assert _heavy_modules_after('import vcmamba_jax.data.transforms') == []
  # The pipeline needs grain, which (0.2.x, its profiler) imports jax itself; TFDS stays out.
  pipeline = _heavy_modules_after('import vcmamba_jax.data.pipeline')
  assert 'grain' in pipeline and 'tensorflow_datasets' not in pipeline


def test_main_py_top_level_is_light():
  # grain spawns its workers, and a spawned process re-runs the main module's top level.
  code = 'import runpy; runpy.run_path("main.py", run_name="__mp_main__")'
  assert _heavy_modules_after(code) == []


def test_datasets_register_when_asked_for():
  code = (
    'import tensorflow_datasets as tfds, vcmamba_jax.data as data\n'
    'before = "vcmamba_digits" in tfds.list_builders(with_community_datasets=False)\n'
    'name = data.DIGITS  # first use of the datasets module\n'
    'after = "vcmamba_digits" in tfds.list_builders(with_community_datasets=False)\n'
    'assert (before, after) == (False, True), (before, after)'
  )
  assert 'tensorflow_datasets' in _heavy_modules_after(code)
