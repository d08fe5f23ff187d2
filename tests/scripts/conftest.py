"""Fixtures for the command-line scripts: the scripts as modules, a small random-weight
1000-class checkpoint (vcmamba_nano at 64 px) in PyTorch and exported form, and test images."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import vcmamba_jax
from vcmamba_jax.convert import save_pretrained, to_pytorch_state_dict

SCRIPTS = Path(__file__).resolve().parents[2] / 'scripts'
NANO = 'vcmamba_nano'
NANO_SIZE = 64


def load_script(name: str) -> ModuleType:
  """Imports scripts/<name>.py (scripts/ is not a package) as module `vcmamba_scripts_<name>`."""
  module_name = f'vcmamba_scripts_{name}'
  if module_name in sys.modules:
    return sys.modules[module_name]
  spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  sys.modules[module_name] = module
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='session')
def nano_variables() -> dict:
  """Random vcmamba_nano variables with 1000 classes at 64 px, as float32 numpy arrays.

  Filled with numpy from the abstract tree (compiling the initialiser takes far longer than
  every test here): N(0, 0.1) weights, BatchNorm variances in [0.5, 1.5], norm scales near 1,
  and a head wide enough that the class probabilities are clearly not uniform.
  """
  model = vcmamba_jax.create_model(NANO, num_classes=1000, img_size=NANO_SIZE)
  abstract = jax.eval_shape(
    lambda: model.init(
      {'params': jax.random.key(0)}, jnp.zeros((1, NANO_SIZE, NANO_SIZE, 3)), train=False
    )
  )
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    names = [getattr(entry, 'key', str(entry)) for entry in path]
    if names[-1] == 'var':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif names[-1] == 'scale':
      value = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif names[1] in ('head', 'dist_head') and names[-1] == 'kernel':
      value = 0.5 * rng.standard_normal(leaf.shape)
    else:
      value = 0.1 * rng.standard_normal(leaf.shape)
    return value.astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope='session')
def nano_pth(nano_variables, tmp_path_factory) -> Path:
  """The nano variables as an authors'-style training checkpoint ({'model': state_dict, ...})."""
  torch = pytest.importorskip('torch')
  state = {
    k: torch.from_numpy(np.array(v)) for k, v in to_pytorch_state_dict(nano_variables, NANO).items()
  }
  path = tmp_path_factory.mktemp('weights') / 'nano.pth'
  torch.save({'model': state, 'epoch': 7, 'scaler': 'none'}, path)
  return path


@pytest.fixture(scope='session')
def nano_exported(nano_variables, tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp('weights') / 'nano_exported'
  save_pretrained(path, nano_variables, NANO, num_classes=1000, img_size=NANO_SIZE)
  return path


@pytest.fixture(scope='session')
def jpeg_images(tmp_path_factory) -> list[Path]:
  """Two small JPEGs of different aspect ratios (landscape, portrait)."""
  directory = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(0)
  paths = []
  for name, (height, width) in (('landscape.jpg', (90, 130)), ('portrait.jpg', (110, 70))):
    yy, xx = np.mgrid[:height, :width]
    pixels = np.stack(
      [xx * 255 // width, yy * 255 // height, rng.integers(0, 256, (height, width))], axis=-1
    ).astype(np.uint8)
    Image.fromarray(pixels).save(directory / name, quality=90)
    paths.append(directory / name)
  return paths


@pytest.fixture
def no_network(monkeypatch) -> list:
  """Makes the machine look offline: every connection attempt raises OSError (as it would
  without network) and is recorded in the returned list."""
  attempts = []

  def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError('network access is blocked in this test')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
  return attempts
