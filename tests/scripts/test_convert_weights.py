"""scripts/convert_weights.py: PyTorch -> exported directory -> PyTorch, verification, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import traverse_util

from tests.scripts.conftest import NANO, load_script
from vcmamba_jax.convert import load_pretrained, read_state_dict, to_pytorch_state_dict

convert_weights = load_script('convert_weights')


def assert_same_variables(actual, expected):
  flat_actual = traverse_util.flatten_dict({c: actual[c] for c in ('params', 'batch_stats')})
  flat_expected = traverse_util.flatten_dict({c: expected[c] for c in ('params', 'batch_stats')})
  assert set(flat_actual) == set(flat_expected)
  for path, value in flat_expected.items():
    np.testing.assert_array_equal(np.asarray(flat_actual[path]), value, err_msg=str(path))


def test_pth_to_exported_dir_loads_identical_variables(nano_pth, nano_variables, tmp_path, capsys):
  output = tmp_path / 'exported'
  assert convert_weights.main(['--input', str(nano_pth), '--output', str(output)]) == 0
  summary = capsys.readouterr().out
  assert 'model        vcmamba_nano' in summary  # detected, not passed
  assert 'params       407,872 (342,872 without dist_head)' in summary
  assert 'img_size     64 (pos_embed 2x2)' in summary
  assert 'num_classes  1000' in summary
  meta = json.loads((output / 'config.json').read_text())
  assert meta['architecture'] == NANO
  assert meta['model_kwargs'] == {'num_classes': 1000, 'img_size': 64}
  assert (output / 'model.safetensors').is_file() and (output / 'README.md').is_file()

  model, variables = load_pretrained(output)
  assert (model.img_size, model.num_classes) == (64, 1000)
  assert_same_variables(variables, nano_variables)


def test_verify_reloads_and_runs_the_model(nano_exported, tmp_path, capsys):
  output = tmp_path / 'again'
  argv = ['--input', str(nano_exported), '--output', str(output), '--model', NANO, '--verify']
  assert convert_weights.main(argv) == 0
  out = capsys.readouterr().out
  assert f'verify: reloaded {output}: 228 arrays bit-identical' in out
  assert 'verify: jitted forward on a random [1, 64, 64, 3] input' in out
  assert 'logits [1, 1000]' in out


@pytest.mark.parametrize(
  'suffix, container', [('.pth', 'model'), ('.pth', 'none'), ('.safetensors', 'model')]
)
def test_to_pytorch_round_trip(nano_exported, nano_variables, tmp_path, suffix, container, capsys):
  torch = pytest.importorskip('torch')
  output = tmp_path / f'back{suffix}'
  argv = [
    '--to_pytorch',
    '--input',
    str(nano_exported),
    '--output',
    str(output),
    '--pytorch_container',
    container,
  ]
  assert convert_weights.main(argv) == 0
  assert 'PyTorch names and layouts' in capsys.readouterr().out

  expected = to_pytorch_state_dict(nano_variables, NANO)
  if suffix == '.pth':
    raw = torch.load(output, weights_only=True)
    state = raw['model'] if container == 'model' else raw
    assert set(state) == set(expected)
    assert state['patch_embed.1.num_batches_tracked'].dtype == torch.int64
  assert set(read_state_dict(output)) == set(expected)
  for key, value in read_state_dict(output).items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  _, variables = load_pretrained(output)  # and back: the variant is detected again
  assert_same_variables(variables, nano_variables)


def test_img_size_resizes_pos_embed(nano_pth, tmp_path, capsys):
  output = tmp_path / 'at96'
  argv = ['--input', str(nano_pth), '--output', str(output), '--img_size', '96']
  assert convert_weights.main(argv) == 0
  assert 'img_size     96 (pos_embed 3x3)' in capsys.readouterr().out
  model, variables = load_pretrained(output)
  assert model.img_size == 96
  assert variables['params']['stage4']['pos_embed'].shape == (1, 3, 3, 64)


def test_corrupt_input_fails_with_a_clear_error(nano_pth, tmp_path, capsys):
  corrupt = tmp_path / 'corrupt.pth'
  corrupt.write_bytes(nano_pth.read_bytes()[:2000])
  output = tmp_path / 'out'
  assert convert_weights.main(['--input', str(corrupt), '--output', str(output)]) == 1
  err = capsys.readouterr().err
  assert err.startswith(f'reading {corrupt} ...\nerror: could not read')
  assert 'corrupt or truncated' in err
  assert not output.exists()


def test_usage_errors_are_reported(nano_pth, nano_exported, tmp_path, capsys):
  cases = [
    (
      ['--input', str(tmp_path / 'missing.pth'), '--output', str(tmp_path / 'o')],
      'no weights at',
    ),
    (['--input', str(nano_pth), '--output', str(tmp_path / 'x.pth')], 'pass --to_pytorch'),
    (
      ['--to_pytorch', '--input', str(nano_exported), '--output', str(tmp_path / 'dir')],
      '--to_pytorch writes a file',
    ),
    (
      ['--input', str(nano_pth), '--output', str(nano_exported)],
      'already exists; pass --overwrite',
    ),
    (
      ['--input', str(nano_pth), '--output', str(tmp_path / 'o'), '--model', 'vcmamba_s'],
      'looks like a vcmamba_nano checkpoint',
    ),
    (
      ['--input', str(tmp_path), '--output', str(tmp_path / 'o')],
      'neither a training run',
    ),
  ]
  for argv, message in cases:
    assert convert_weights.main(argv) == 1, argv
    assert message in capsys.readouterr().err, argv
  with pytest.raises(SystemExit) as info:  # argparse: a missing required flag
    convert_weights.main(['--input', str(nano_pth)])
  assert info.value.code == 2
