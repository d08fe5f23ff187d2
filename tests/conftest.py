"""Test-wide setup, before anything initialises a JAX backend.

- 8 simulated CPU devices, so that sharding and multi-device code paths run on a laptop.
- A persistent XLA compilation cache: tests that build the same program (every training run of
  tests/train uses the same smoke config) compile it once per machine instead of once per run.
  Set JAX_COMPILATION_CACHE_DIR to move it; the cache only ever replays identical programs.
"""

import os
import tempfile

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
