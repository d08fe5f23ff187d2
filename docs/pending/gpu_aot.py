r"""Compiles B's train (and eval) step for an H100 on a host without a GPU, and reports what the
compiled program moves, kernel by kernel (issue 10: decide before a scarce GPU call).

  python3 -m venv /tmp/gpuvenv && /tmp/gpuvenv/bin/pip install "jax[cuda12]==<jax version>" \
      flax optax orbax-checkpoint ml_collections grain tensorflow-datasets tensorboard \
      safetensors huggingface_hub flatbuffers pillow
  XLA_FLAGS=--xla_gpu_enable_triton_gemm=false PYTHONPATH=. /tmp/gpuvenv/bin/python \
      docs/pending/gpu_aot.py --config=vcmamba_jax/configs/vcmamba_b.py \
      --config.model.dtype=bfloat16 --config.distillation.type=none \
      --config.global_batch_size=128 --config.eval_batch_size=256 [--hlo_out=train.hlo]
  python3 docs/pending/gpu_aot.py --bytes train.hlo other.hlo    # compare two compiled steps

JAX compiles for a described GPU without one (`topologies.get_topology_desc(platform='cuda',
target_config=...)`, jax >= 0.10 with the CUDA plugin installed). Nothing is autotuned, so
Triton GEMM fusions must be off (without autotuning XLA finds no tiling for some of B's dots);
cuBLAS then runs every dot, with explicit transposes the real program does not have. The
memory analysis and the fusion structure are otherwise those of the real compile; the bytes
per kernel (operands + results; a Pallas kernel's own traffic inside is not seen) sum to a
lower bound of the step time at the card's bandwidth.

Found with it (2026-12-07): XLA kept BatchNorm's dz in float32 between the reduction and the dx
kernels (3.3 GB a step, fixed in ops._bn_backward); 'pallas' depthwise saves 33 GB moved and
1.2 GiB of temporaries per step against 'taps'.
"""

from __future__ import annotations

import collections
import os
import pathlib
import re
import sys

H100 = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 8 }
runtime_version { major: 12 minor: 9 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""
_SIZES = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2}
_SIZES.update({'s16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1})
_KERNEL_OPS = ('fusion', 'custom-call', 'copy', 'convolution', 'transpose', 'reduce', 'select')


def _nbytes(shape: str) -> int:
  total = 0
  for dtype, dims in re.findall(r'([a-z0-9]+)\[([0-9,]*)\]', shape):
    if dtype in _SIZES:
      count = 1
      for d in dims.split(','):
        count *= int(d) if d else 1
      total += _SIZES[dtype] * count
  return total


def kernel_bytes(hlo: str) -> list[tuple[int, str, str]]:
  """(bytes of operands + results, opcode, op_name) per kernel of the entry computation."""
  entry = hlo[hlo.index('\nENTRY') :]
  shapes, rows = {}, []
  line_re = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\([^=]*?\)|\S+) ([a-z\-]+)\((.*)$')
  for line in entry.splitlines()[1:]:
    match = line_re.match(line)
    if not match:
      continue
    name, shape, op, rest = match.groups()
    shapes[name] = shape
    if op in _KERNEL_OPS:
      operands = re.findall(r'%([\w\.\-]+)', rest.split(')')[0])
      scope = re.search(r'op_name="([^"]*)"', line)
      total = sum(_nbytes(shapes.get(a, '')) for a in operands) + _nbytes(shape)
      rows.append((total, op, scope.group(1) if scope else '?'))
  return rows


def print_bytes(paths: list[str], bandwidth: float = 3.35e12) -> None:
  for path in paths:
    rows = kernel_bytes(pathlib.Path(path).read_text())
    total = sum(r[0] for r in rows)
    print(
      f'{path}: {len(rows)} kernels, {total / 1e9:.2f} GB moved, >= '
      f'{total / bandwidth * 1e3:.1f} ms at {bandwidth / 1e12:.2f} TB/s'
    )
    by_scope = collections.Counter()
    for nbytes, _, scope in rows:
      scope = re.sub(r'block\d+', 'block*', scope.replace('jit(train_step)/', ''))
      by_scope[('bwd ' if 'transpose(' in scope else 'fwd ') + scope[-80:]] += nbytes
    for scope, nbytes in by_scope.most_common(15):
      print(f'  {nbytes / 1e9:7.2f} GB  {scope}')


def compile_for_h100() -> None:
  os.environ['JAX_PLATFORMS'] = 'cpu'
  import jax
  from absl import app, flags
  from jax.experimental import topologies
  from ml_collections import config_flags

  topology = topologies.get_topology_desc(platform='cuda', target_config=H100, topology='1x1x1')
  # The model picks its GPU kernels by the default backend; this host's is the CPU.
  jax.default_backend = lambda: 'gpu'
  from vcmamba_jax.models import batchnorm_pallas, depthwise_pallas, pallas_gpu, scan_pallas
  from vcmamba_jax.train import aot

  depthwise_pallas.available = lambda: True
  batchnorm_pallas.available = lambda: True
  pallas_gpu.ptx_fma_works = lambda: True
  scan_pallas.fused_backend_available = lambda: True
  chip = aot.Chip('h100', 'NVIDIA H100 80GB HBM3', 80 * aot.GiB, 989.0, 3352.0)
  aot.topology_devices = lambda _: (topology.devices, chip)
  aot.resolve_scan_impl = lambda c: 'fused' if c.model.scan_impl == 'auto' else c.model.scan_impl
  config = config_flags.DEFINE_config_file('config', None, 'training config', lock_config=False)
  hlo_out = flags.DEFINE_string('hlo_out', None, "write the train step's compiled HLO here")
  eval_hlo_out = flags.DEFINE_string('eval_hlo_out', None, "write the eval step's HLO here")
  skip_eval = flags.DEFINE_bool('skip_eval', False, 'compile the train step only')

  def main(_):
    compile_one = aot._compile
    texts = []

    def compile_and_keep(jitted, args, chip):
      report, compiled = compile_one(jitted, args, chip)
      if compiled is not None:
        texts.append(compiled.as_text())
      return report, compiled

    aot._compile = compile_and_keep
    report = aot.compile_for_topology(config.value, 'h100', with_eval=not skip_eval.value)
    if hlo_out.value:
      with open(hlo_out.value, 'w') as f:
        f.write(texts[0])
    if eval_hlo_out.value and len(texts) > 1:
      with open(eval_hlo_out.value, 'w') as f:
        f.write(texts[1])
    for step, text in zip(('train', 'eval'), texts):
      memory = report[step]['memory']
      gib = {k: memory[k] / aot.GiB for k in ('arguments', 'temporaries', 'total')}
      moved = sum(r[0] for r in kernel_bytes(text))
      print(
        f'{step}: compiled in {report[step]["compile_seconds"]:.1f} s (lowered in '
        f'{report[step]["lower_seconds"]:.1f} s); arguments '
        f'{gib["arguments"]:.2f} GiB, temporaries {gib["temporaries"]:.2f} GiB, total '
        f'{gib["total"]:.3f} GiB; {len(kernel_bytes(text))} kernels, {moved / 1e9:.2f} GB moved'
      )

  app.run(main)


if __name__ == '__main__':
  if sys.argv[1:2] == ['--bytes']:
    print_bytes(sys.argv[2:])
  else:
    compile_for_h100()
