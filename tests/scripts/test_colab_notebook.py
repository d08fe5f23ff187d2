"""scripts/colab_inference.ipynb: runs top to bottom offline, its Hub weights served from a prepared
Hugging Face cache, on a local image."""

from __future__ import annotations

import re
import sys

import nbformat
import pytest

from tests.hub_cache import add_to_hub_cache
from tests.scripts.conftest import NANO, SCRIPTS
from vcmamba_jax.convert import resolve_hub_path
from vcmamba_jax.data import imagenet_class_names

NOTEBOOK = SCRIPTS / 'colab_inference.ipynb'
PREDICTION = re.compile(r'^(\d+)\. (.+?)\s+(\d\.\d{4})$')


def code_cells() -> list[str]:
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(notebook)
  return [cell.source for cell in notebook.cells if cell.cell_type == 'code']


def as_python(source: str) -> str:
  """IPython shell/magic lines (`%pip ...`, `!cmd`) become `pass`, keeping the indentation."""
  lines = []
  for line in source.splitlines():
    stripped = line.lstrip()
    indent = line[: len(line) - len(stripped)]
    lines.append(f'{indent}pass' if stripped.startswith(('%', '!')) else line)
  return '\n'.join(lines)


def run_cells(sources: list[str]) -> dict:
  namespace: dict = {'__name__': '__notebook__'}
  for number, source in enumerate(sources):
    code = compile(as_python(source), f'<notebook cell {number}>', 'exec')
    exec(code, namespace)
  return namespace


def test_notebook_is_clean_and_parameterised():
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  assert notebook.nbformat == 4
  code = [cell for cell in notebook.cells if cell.cell_type == 'code']
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  parameters = [cell for cell in code if 'parameters' in cell.metadata.get('tags', [])]
  assert len(parameters) == 1
  for name in ('MODEL', 'WEIGHTS', 'IMAGE', 'TOPK'):
    assert re.search(rf'^{name} = ', parameters[0].source, re.MULTILINE)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
  """An empty Hugging Face cache in HF_HUB_CACHE, read offline (HF_HUB_OFFLINE=1)."""
  cache = tmp_path / 'hf_cache'
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return cache


def test_notebook_classifies_an_image_offline(
  nano_exported, jpeg_images, hub_cache, monkeypatch, no_network, capsys
):
  # The Hub path of a save_pretrained folder, served from a prepared cache.
  add_to_hub_cache(hub_cache, 'someone/vcmamba-nano', {p.name: p for p in nano_exported.iterdir()})
  monkeypatch.setenv('VCMAMBA_MODEL', NANO)
  monkeypatch.setenv('VCMAMBA_WEIGHTS', 'hf-hub:someone/vcmamba-nano')
  monkeypatch.setenv('VCMAMBA_IMAGE', str(jpeg_images[0]))
  monkeypatch.delenv('VCMAMBA_TOPK', raising=False)
  namespace = run_cells(code_cells())
  out = capsys.readouterr().out

  predictions = [PREDICTION.match(line) for line in out.splitlines()]
  predictions = [match.groups() for match in predictions if match]
  assert [int(rank) for rank, _, _ in predictions] == [1, 2, 3, 4, 5]
  names = set(imagenet_class_names())
  assert all(name in names for _, name, _ in predictions)
  probs = [float(prob) for _, _, prob in predictions]
  assert probs == sorted(probs, reverse=True)
  assert 0 < sum(probs) <= 1.0 + 1e-3
  assert namespace['probs'].shape == (1000,)
  assert namespace['probs'].sum() == pytest.approx(1.0, abs=1e-4)
  assert namespace['crop'].shape == (64, 64, 3)  # preprocessed at the model's resolution
  assert no_network == []


def test_official_weights_come_from_the_hub(nano_pth, hub_cache, monkeypatch, no_network):
  monkeypatch.setenv('VCMAMBA_MODEL', 'vcmamba_m')
  monkeypatch.setenv('VCMAMBA_WEIGHTS', '')
  parameters, weights = [
    source for source in code_cells() if source.startswith(('# Parameters', 'import vcmamba_jax'))
  ]
  namespace = run_cells([parameters, weights])
  assert namespace['weights'] == 'hf-hub:SLDGroup/VCMamba/VCMamba-M.pth'
  # ... which the next cell's load_pretrained reads from the cache (here offline).
  commit = add_to_hub_cache(hub_cache, 'SLDGroup/VCMamba', {'VCMamba-M.pth': nano_pth})
  assert resolve_hub_path(namespace['weights']) == str(
    hub_cache / f'models--SLDGroup--VCMamba/snapshots/{commit}/VCMamba-M.pth'
  )
  assert no_network == []


def test_example_image_falls_back_offline(monkeypatch, no_network, capsys):
  monkeypatch.setitem(sys.modules, 'skimage', None)  # as if scikit-image were missing
  image_cell = next(source for source in code_cells() if 'def load_image' in source)
  namespace = run_cells(["import urllib.request\nimport numpy as np\nIMAGE = ''", image_cell])
  assert namespace['image'].mode == 'RGB'
  assert 'using a synthetic gradient' in capsys.readouterr().out
