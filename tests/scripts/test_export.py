"""scripts/export.py and vcmamba_jax.load_exported: one artifact (cpu, cuda, tpu; symbolic batch)
served at two batch sizes by a process that imports neither Flax nor the model code."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import vcmamba_jax
from tests.scripts.conftest import NANO, NANO_SIZE, load_script
from vcmamba_jax import serving
from vcmamba_jax.convert import export as export_lib
from vcmamba_jax.data import normalize

ROOT = Path(__file__).resolve().parents[2]
SERVE = r"""
import json, sys
import numpy as np
import vcmamba_jax

model = vcmamba_jax.load_exported(sys.argv[1])
images = np.load(sys.argv[2])
np.savez(sys.argv[3], b3=model(images), b1=model(images[:1]))
imported = [
  name for name in sys.modules
  if name.split('.')[0] in ('flax', 'optax', 'orbax', 'tensorflow_datasets', 'torch')
  or name.startswith(('vcmamba_jax.models', 'vcmamba_jax.convert', 'vcmamba_jax.data'))
]
print(json.dumps({'imported': imported, 'platforms': list(model.platforms)}))
"""


@pytest.fixture(scope='module')
def export_dir(nano_exported, tmp_path_factory) -> Path:
  """scripts/export.py on the nano folder: the default platforms (cpu, cuda, tpu)."""
  output = tmp_path_factory.mktemp('export') / 'nano'
  assert load_script('export').main(['--weights', str(nano_exported), '--output', str(output)]) == 0
  return output


def test_export_serves_two_batch_sizes_without_flax(export_dir, nano_variables, tmp_path):
  metadata = json.loads((export_dir / 'export.json').read_text())
  assert metadata['platforms'] == ['cpu', 'cuda', 'tpu']
  assert metadata['input']['shape'] == ['batch', NANO_SIZE, NANO_SIZE, 3]
  assert metadata['output']['shape'] == ['batch', 1000]
  images = np.random.default_rng(0).integers(0, 256, (3, NANO_SIZE, NANO_SIZE, 3), np.uint8)
  np.save(tmp_path / 'images.npy', images)
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
    [
      sys.executable,
      '-c',
      SERVE,
      str(export_dir),
      str(tmp_path / 'images.npy'),
      str(tmp_path / 'o.npz'),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert report == {'imported': [], 'platforms': ['cpu', 'cuda', 'tpu']}

  model = vcmamba_jax.create_model(NANO, num_classes=1000, img_size=NANO_SIZE)
  want = np.asarray(
    jax.jit(lambda v, x: model.apply(v, normalize(x), train=False)[0])(nano_variables, images)
  )
  with np.load(tmp_path / 'o.npz') as got:
    assert got['b3'].shape == (3, 1000) and got['b1'].shape == (1, 1000)
    np.testing.assert_allclose(got['b3'], want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got['b1'], want[:1], rtol=0, atol=1e-5)
  assert np.abs(want).max() > 0.1  # logits that say something (random weights, 1000 classes)


def test_export_for_other_platforms_is_refused_here(nano_variables, tmp_path):
  model = vcmamba_jax.create_model(NANO, num_classes=1000, img_size=NANO_SIZE)
  directory = export_lib.export_model(
    model, nano_variables, tmp_path / 'gpu_tpu', platforms=('cuda', 'tpu')
  )
  with pytest.raises(serving.ExportError) as error:
    vcmamba_jax.load_exported(directory)
  message = str(error.value)
  assert "was exported for ['cuda', 'tpu'], but this process runs on 'cpu'" in message
  assert '--platforms cuda,tpu,cpu' in message


def test_damaged_export_names_the_file(export_dir, tmp_path):
  def damaged(edit) -> str:
    copy = tmp_path / f'copy{len(list(tmp_path.iterdir()))}'
    shutil.copytree(export_dir, copy)
    edit(copy)
    with pytest.raises(serving.ExportError) as error:
      vcmamba_jax.load_exported(copy)
    assert 'python scripts/export.py' in str(error.value)
    return str(error.value)

  def truncate(d):
    data = (d / 'weights.npz').read_bytes()
    (d / 'weights.npz').write_bytes(data[: len(data) // 2])

  def flip(d):
    data = bytearray((d / 'forward.jax_export').read_bytes())
    data[len(data) // 2] ^= 0xFF
    (d / 'forward.jax_export').write_bytes(bytes(data))

  assert 'weights.npz has' in damaged(truncate) and 'truncated' in damaged(truncate)
  assert 'forward.jax_export does not match the sha256' in damaged(flip)
  assert 'export.json is missing' in damaged(lambda d: (d / 'export.json').unlink())
  assert 'weights.npz is missing' in damaged(lambda d: (d / 'weights.npz').unlink())


def test_export_script_rejects_unknown_platforms(nano_exported, tmp_path, capsys):
  with pytest.raises(SystemExit) as info:
    load_script('export').main(
      ['--weights', str(nano_exported), '--output', str(tmp_path), '--platforms', 'gpu']
    )
  assert info.value.code == 2
  assert 'unknown platforms' in capsys.readouterr().err
