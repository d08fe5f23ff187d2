"""vcmamba_jax/configs/finetune.py on a generated image folder: official-style weights from the Hub path (a
prepared offline cache), new heads, another resolution; trains, evaluates and resumes. And the
errors of bad image folders."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import vcmamba_jax
from tests.hub_cache import add_to_hub_cache
from tests.scripts import conftest as scripts_fixtures
from tests.scripts.conftest import load_script
from vcmamba_jax import train
from vcmamba_jax.configs import finetune
from vcmamba_jax.data import image_folder as image_folder_lib

CLASSES = ('cat', 'dog', 'fish')
# The random nano weights (1000 classes, 64 px) as a save_pretrained folder.
nano_variables = scripts_fixtures.nano_variables
nano_exported = scripts_fixtures.nano_exported


def write_image_folder(root: Path, classes=CLASSES, per_class: int = 6) -> Path:
  """Small JPEGs/PNGs whose dominant colour is the class; a non-image with an image name, a
  text file and a hidden file that are not images."""
  rng = np.random.default_rng(0)
  for label, name in enumerate(classes):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 80, (40 + 4 * i, 52, 3))
      pixels[..., label % 3] += 170
      suffix = 'png' if i % 3 == 0 else 'jpg'
      Image.fromarray(pixels.astype(np.uint8)).save(root / name / f'{i}.{suffix}')
  (root / classes[0] / 'broken.jpg').write_bytes(b'\xff\xd8 this is not a JPEG')
  (root / classes[0] / 'notes.txt').write_text('not an image')
  (root / classes[-1] / '.hidden.jpg').write_bytes(b'')
  return root


def finetune_config(image_folder: Path, init_from: str, num_train_steps: int):
  config = finetune.get_config('smoke')
  config.data.image_folder = str(image_folder)
  config.init_from = init_from
  config.num_train_steps = num_train_steps
  config.lock()
  return config


def read_metrics(workdir: Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_finetune_on_an_image_folder_trains_evaluates_and_resumes(
  nano_exported,
  tmp_path,
  monkeypatch,
  caplog,
):
  cache = tmp_path / 'hf_cache'
  add_to_hub_cache(cache, 'someone/vcmamba-nano', {p.name: p for p in nano_exported.iterdir()})
  monkeypatch.setenv('HF_HUB_CACHE', str(cache))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  folder = write_image_folder(tmp_path / 'pets')
  workdir = tmp_path / 'run'

  # 1000 classes at 64 px -> 3 classes (heads re-initialised) at 32 px (pos_embed resized).
  caplog.set_level('INFO')
  first = train.run(finetune_config(folder, 'hf-hub:someone/vcmamba-nano', 4), str(workdir))
  log = caplog.text
  assert 'skipping' in log and 'broken.jpg' in log  # the non-image is skipped, with one line
  assert 'Initialised the weights from pretrained weights hf-hub:someone/vcmamba-nano' in log
  assert (workdir / 'class_names.txt').read_text() == 'cat\ndog\nfish\n'
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['model']['num_classes'] == 3  # 0 = from the data
  assert 0 <= first['eval/top1'] <= 1 and np.isfinite(first['eval/loss'])
  assert np.isfinite(first['train/loss'])
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows if 'train/loss' in r] == [2, 4]
  assert any('eval/top1' in r for r in rows)

  caplog.clear()
  second = train.run(finetune_config(folder, 'hf-hub:someone/vcmamba-nano', 6), str(workdir))
  assert 'Resumed from' in caplog.text
  assert 'Initialised the weights' not in caplog.text  # resuming never re-reads init_from
  rows = read_metrics(workdir)
  assert [r['step'] for r in rows if 'train/loss' in r] == [2, 4, 6]
  assert np.isfinite(second['eval/loss'])

  # The fine-tuned run is weights for predict/export/the Hub: as a workdir, or converted into an
  # uploadable save_pretrained folder.
  model, variables = vcmamba_jax.load_pretrained(workdir)
  assert (model.name, model.num_classes, model.img_size) == (None, 3, 32)
  assert variables['params']['head']['kernel'].shape == (64, 3)
  folder_out = tmp_path / 'upload'
  argv = ['--input', str(workdir), '--output', str(folder_out)]
  assert load_script('convert_weights').main(argv) == 0
  _, exported = vcmamba_jax.load_pretrained(folder_out)
  jax.tree.map(np.testing.assert_array_equal, exported, jax.device_get(variables))


def test_image_folder_split_is_deterministic_and_stratified(tmp_path):
  folder = write_image_folder(tmp_path / 'f', per_class=10)
  a = image_folder_lib.open_image_folder(folder, val_fraction=0.2, split_seed=0)
  assert a.classes == CLASSES
  val = a.source('validation')
  assert np.bincount(val.labels).tolist() == [2, 2, 2]
  assert len(a.source('train')) == 3 * 8  # broken.jpg, notes.txt and .hidden.jpg left out
  record = val[0]
  assert (
    record['image'][:4] in (b'\x89PNG', b'\xff\xd8\xff\xe0') and record['label'] == val.labels[0]
  )
  same = image_folder_lib.open_image_folder(folder, val_fraction=0.2, split_seed=0)
  other = image_folder_lib.open_image_folder(folder, val_fraction=0.2, split_seed=1)
  assert same.source('validation').files == val.files
  assert other.source('validation').files != val.files


def test_image_folder_with_train_and_val_subfolders(tmp_path):
  write_image_folder(tmp_path / 'd' / 'train')
  write_image_folder(tmp_path / 'd' / 'val', per_class=2)
  folder = image_folder_lib.open_image_folder(tmp_path / 'd')
  assert (len(folder.source('train')), len(folder.source('val'))) == (18, 6)


@pytest.mark.parametrize(
  'make, message',
  [
    (
      lambda r: write_image_folder(r, classes=('only',)),
      "has only ['only']: a classifier needs at least 2",
    ),
    (lambda r: r.mkdir(), 'has no class subfolders'),
    (
      lambda r: (
        write_image_folder(r),
        (r / 'cat' / 'x').mkdir(),
        [p.unlink() for p in (r / 'dog').iterdir()],
      ),
      "classes ['dog'] have fewer than 2 readable images",
    ),
    (
      lambda r: (
        write_image_folder(r / 'train'),
        write_image_folder(r / 'val', classes=('cat', 'emu'), per_class=1),
      ),
      "has classes that train/ lacks: ['emu']",
    ),
    (lambda r: write_image_folder(r / 'train'), 'has a train/ subfolder but no val/'),
  ],
)
def test_bad_image_folders_are_clear_errors(tmp_path, make, message):
  make(tmp_path / 'data')
  with pytest.raises(image_folder_lib.ImageFolderError, match=None) as error:
    image_folder_lib.open_image_folder(tmp_path / 'data')
  assert message in str(error.value)


def test_missing_hub_weights_stop_the_finetune_with_the_fix(tmp_path, monkeypatch):
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'empty_cache'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  folder = write_image_folder(tmp_path / 'pets')
  config = finetune.get_config('smoke')
  config.data.image_folder = str(folder)
  config.init_from = 'hf-hub:SLDGroup/VCMamba/VCMamba-S.pth'
  with pytest.raises(Exception, match='not in the Hugging Face cache') as error:
    train.run(config, str(tmp_path / 'run'))
  assert 'hf download SLDGroup/VCMamba VCMamba-S.pth' in str(error.value)


def test_finetune_config_variants():
  config = finetune.get_config('b')
  assert (config.model.name, config.init_from) == (
    'vcmamba_b',
    'hf-hub:SLDGroup/VCMamba/VCMamba-B.pth',
  )
  assert config.model.num_classes == 0 and config.schedule.decay_epochs == config.num_epochs == 30
  assert finetune.get_config(None).model.name == 'vcmamba_s'
  with pytest.raises(ValueError, match='pick one variant'):
    finetune.get_config('s,b')
