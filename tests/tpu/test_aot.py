"""Ahead-of-time compilation of the real train step for a TPU slice (v5e:2x2) on the CPU:
needs libtpu (the [tpu] extra, part of [dev]); no TPU."""

from __future__ import annotations

import os

import jax
import pytest

pytest.importorskip('libtpu')
# Before any JAX backend loads libtpu: compiling needs no exclusive hold on it (another compile,
# e.g. scripts/aot_compile.py, may be running on this host).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

from vcmamba_jax.configs import vcmamba_b, vcmamba_s
from vcmamba_jax.train import aot, builders

TOPOLOGY = 'v5e:2x2'  # 4 chips, one host


def _config(fsdp):
  config = vcmamba_s.get_config('smoke')  # vcmamba_nano at 32 px, the full recipe's step
  config.unlock()
  config.mesh.fsdp = fsdp
  config.mesh.fsdp_min_size = 2**10
  return config


@pytest.fixture(scope='module')
def report():
  """One compile (a nano train step takes about a minute of libtpu here): data parallelism over
  2 chips times fsdp over 2, so that both kinds of collective and the sharded state show."""
  return aot.compile_for_topology(_config(2), TOPOLOGY, per_chip_batch=2, with_eval=False)


def test_compiles_for_the_slice_with_the_tpu_kernel(report):
  assert report['chips'] == 4 and report['chip_kind'] == 'TPU v5 lite'
  assert report['mesh'] == {'data': 2, 'fsdp': 2}
  assert report['scan_impl'] == 'pallas_tpu' and report['fits'] is True
  assert report['libtpu'] and report['jax'] == jax.__version__
  train = report['train']
  assert 0 < train['memory']['total'] < report['hbm_per_chip']
  assert train['flops'] > 0 and train['bytes_accessed'] > 0
  # The gradients (and BatchNorm's statistics) are all-reduced over the data axis; the fsdp
  # axis gathers the parameters and reduce-scatters their gradients.
  assert train['collectives']['all-reduce']['count'] > 0
  assert 'all-gather' in train['collectives'] or 'reduce-scatter' in train['collectives']


def test_fsdp_shards_parameters_and_optimizer_by_the_axis_size(report):
  train = report['train']
  whole = report['params_opt_bytes']  # unsharded, from the shapes
  sharded = train['params_opt_bytes_per_chip']  # from the executable's input shardings
  assert sharded == report['params_opt_bytes_per_chip']  # what we asked for is what compiled
  # Arrays of at least fsdp_min_size elements are split 2 ways, the few small ones replicated.
  assert whole / 2 < sharded < 0.55 * whole
  # The whole train state (parameters, AdamW moments and EMA split alike) per chip.
  assert report['state_bytes'] - report['state_bytes_per_chip'] >= whole - sharded


def test_bad_topology_and_batch_are_clear_errors():
  with pytest.raises(ValueError, match='unknown TPU topology'):
    aot.parse_topology('v7x:2x2')
  with pytest.raises(ValueError, match='3 axes'):
    aot.parse_topology('v4:4x4')
  config = _config(1)
  config.global_batch_size = 6
  with pytest.raises(ValueError, match='does not divide over the 4 chips'):
    aot.compile_for_topology(config, TOPOLOGY)


def test_known_libtpu_crash_is_refused_with_the_fix(monkeypatch):
  # libtpu 0.0.42.1 segfaults compiling B's train step for v6e; 0.0.48.1 and 0.0.52 compile it.
  config = vcmamba_b.get_config()
  monkeypatch.setattr(builders, 'libtpu_version', lambda: '0.0.42.1')
  with pytest.raises(RuntimeError, match=r'pip install "libtpu>=0\.0\.48\.1"'):
    aot.compile_for_topology(config, 'v6e:2x2')  # refused before anything is built
  for version in ('0.0.48.1', '0.0.52'):
    builders.check_compiler(config, 'TPU v6 lite', version)
  builders.check_compiler(config, 'TPU v5 lite', '0.0.42.1')  # v5e compiles B
  builders.check_compiler(vcmamba_s.get_config(), 'TPU v6 lite', '0.0.42.1')  # and v6e S
  builders.check_compiler(config, 'NVIDIA H200')  # not a TPU


@pytest.mark.parametrize('topology, chips', [('v4:2x2x1', 4), ('v5p:2x2x1', 4), ('v6e:2x2', 4)])
def test_one_device_per_chip_on_every_generation(topology, chips):
  # v4's libtpu topology lists both TensorCores of a chip unless asked for megacore, which is
  # what a v4 VM runs and what JAX's meshes need.
  devices, chip = aot.topology_devices(topology)
  assert len(devices) == chips
  assert {d.core_on_chip for d in devices} == {0}
  assert len({tuple(d.coords) for d in devices}) == chips


def test_capacity_estimate_is_linear_in_the_batch_and_fsdp_saves_the_state():
  gib = 2**30
  report = {
    'model': 'vcmamba_b',
    'topology': 'v5e:4x4',
    'per_chip_batch': 64,
    'state_bytes_per_chip': 1 * gib,
    'train': {
      'memory': {'total': 8 * gib, 'temporaries': 6 * gib},  # 2 GiB fixed, 96 MiB per image
      'flops': 64e12,
      'bytes_accessed': 64e9,
    },
  }
  data = aot.estimate_capacity(report, 'v5e:16x16', fsdp=False)
  # 0.9 * 16 GiB = 14.4 GiB; (14.4 - 2) GiB / 96 MiB = 132.3 -> 128 (multiple of 8).
  assert data['per_chip_batch'] == 128 and data['chips'] == 256
  assert data['memory_per_chip'] == 2 * gib + 128 * 6 * gib / 64
  # 1 TFLOP and 1 GB per image: 128 TFLOP / 197 TFLOP/s = 0.65 s > 128 GB / 819 GB/s = 0.16 s.
  assert data['bound_by'] == 'compute'
  assert abs(data['step_time_bound_s'] - 128e12 / 197e12) < 1e-9
  fsdp = aot.estimate_capacity(report, 'v5e:16x16', fsdp=True)
  # The state shrinks to 1/256: (14.4 - 2 + 255/256) GiB / 96 MiB = 142.9 -> 136.
  assert fsdp['per_chip_batch'] == 136
  # A bigger chip holds more: v5p's 95 GiB.
  assert aot.estimate_capacity(report, 'v5p:4x4x4', fsdp=False)['per_chip_batch'] == 888


def test_capacity_estimate_from_two_compiles_uses_the_line_through_them():
  gib = 2**30

  def report(batch, total):
    return {
      'model': 'vcmamba_b',
      'topology': 'v5e:2x2',
      'per_chip_batch': batch,
      'state_bytes_per_chip': gib,
      'train': {
        'memory': {'total': total, 'temporaries': total - gib},
        'flops': 1.0,
        'bytes_accessed': 1.0,
      },
    }

  # 4 GiB at 64, 6 GiB at 128: 1/32 GiB per image over a 2 GiB base; (14.4 - 2) * 32 = 396.8.
  e = aot.estimate_capacity(report(64, 4 * gib), 'v5e:2x2', fsdp=False, second=report(128, 6 * gib))
  assert e['per_chip_batch'] == 392
  # One compile alone: proportional temporaries (3 GiB per 64 images), so fewer fit.
  assert aot.estimate_capacity(report(64, 4 * gib), 'v5e:2x2', fsdp=False)['per_chip_batch'] == 280
