"""scripts/model_info.py: exact parameter counts and the GMACs of the paper's table."""

from __future__ import annotations

import json

import pytest

from tests.scripts.conftest import load_script

model_info = load_script('model_info')

# Upstream parameter counts (both heads / without dist_head), from the authors' state_dicts.
EXPECTED = {
  'vcmamba_s': (10_478_720, 10_189_720),
  'vcmamba_m': (21_072_176, 20_623_176),
  'vcmamba_b': (31_450_832, 30_937_832),
}


def test_parameter_counts_are_exact(capsys):
  assert model_info.main(['--no_flops', '--json']) == 0
  rows = json.loads(capsys.readouterr().out)
  assert [row['model'] for row in rows] == list(EXPECTED)
  for row in rows:
    assert (row['params'], row['params_without_dist_head']) == EXPECTED[row['model']]
    assert row['paper']['params_m'] == pytest.approx(row['params'] / 1e6, abs=0.1)
    assert 'gmacs_xla' not in row


def test_parameter_table(capsys):
  assert model_info.main(['--no_flops', '--models', 'vcmamba_b']) == 0
  table = capsys.readouterr().out
  assert 'vcmamba_b' in table and '31,450,832' in table and '30,937,832' in table


def test_vcmamba_s_gmacs_match_the_paper():
  info = model_info.model_info('vcmamba_s', 224)
  # Convolutions + matmuls: the paper's 1.1 GMACs (1.041 G conv+linear, plus the scan's
  # output einsum).
  assert info['gmacs_matmul'] == pytest.approx(1.1, rel=0.10)
  assert 1.041 <= info['gmacs_matmul'] <= 1.07
  # XLA also counts elementwise work and the scan: more, but the same order.
  assert info['gmacs_matmul'] < info['gmacs_xla'] < 1.5 * info['gmacs_matmul']
