"""Ahead-of-time compilation of the training program for a Cloud TPU slice, on any host.

`compile_for_topology(config, 'v5e:16x16')` builds what `train_and_evaluate` builds (the mesh, the
sharded TrainState from shapes only, the jitted train and eval steps), but over the devices of a
TPU topology description (`jax.experimental.topologies`, needs `libtpu`: the `[tpu]` extra) and
compiles both steps for that slice without any TPU attached. The compiled programs' memory
analysis, cost analysis and HLO say whether a step fits the chip's HBM, how much it computes and
moves, and which collectives it runs (scripts/aot_compile.py prints them).

`scan_impl='auto'` resolves to what it would pick on a TPU ('pallas_tpu'): the compile traces on
this host, whose default backend is not the target's.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import ConfigDict

from vcmamba_jax import sharding as sharding_lib
from vcmamba_jax.models import scan as scan_lib
from vcmamba_jax.train import builders, distillation, optim, steps
from vcmamba_jax.train import state as state_lib

GiB = 2**30
IMAGENET_TRAIN_IMAGES = 1_281_167


@dataclass(frozen=True)
class Chip:
  """Per-chip numbers of a TPU generation (Cloud TPU system-architecture pages)."""

  name: str  # the topology prefix: v4, v5e, v5p, v6e
  device_kind: str  # jax's device_kind
  hbm_bytes: int
  peak_bf16_tflops: float
  hbm_gbytes_per_s: float


CHIPS: dict[str, Chip] = {
  'v4': Chip('v4', 'TPU v4', 32 * GiB, 275.0, 1228.0),
  'v5e': Chip('v5e', 'TPU v5 lite', 16 * GiB, 197.0, 819.0),
  'v5p': Chip('v5p', 'TPU v5', 95 * GiB, 459.0, 2765.0),
  'v6e': Chip('v6e', 'TPU v6 lite', 32 * GiB, 918.0, 1640.0),
}
_TOPOLOGY = re.compile(r'^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$')
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


def parse_topology(topology: str) -> tuple[Chip, int]:
  """'v5e:16x16' -> (CHIPS['v5e'], 256). Raises ValueError naming the accepted forms."""
  match = _TOPOLOGY.match(topology.strip())
  if not match:
    raise ValueError(
      f'unknown TPU topology {topology!r}: expected <generation>:<chips per axis>, generation '
      f'one of {sorted(CHIPS)}, e.g. v5e:4x4 (v5e-16), v5e:16x16 (v5e-256), v6e:8x8, v4:2x2x4 '
      '(v4-32: 16 chips), v5p:4x4x4 (v5p-128: 64 chips). v4/v5p take 3 axes, v5e/v6e 2.'
    )
  name, dims = match.groups()
  sizes = [int(d) for d in dims.split('x')]
  if (len(sizes) == 3) != (name in ('v4', 'v5p')):
    raise ValueError(
      f'TPU topology {topology!r}: {name} slices are described by '
      + ('3 axes, e.g. v4:2x2x4' if name in ('v4', 'v5p') else '2 axes, e.g. v5e:4x4')
    )
  return CHIPS[name], int(np.prod(sizes))


# What libtpu prints to stderr when it loads on a host without a TPU (harmless: we only compile).
_LIBTPU_NOISE = re.compile(
  r'TPU_ACCELERATOR_TYPE|TPU_WORKER_HOSTNAMES|Logging before InitGoogle|Source Location Trace|'
  r'libtpu_init_utils|Failed to find host bounds|^\s*$'
)


@contextlib.contextmanager
def _libtpu_noise_filtered():
  """Captures the process's stderr (fd 2, where libtpu's C++ logging goes) and re-emits every
  line but libtpu's start-up warnings about the missing TPU."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode='w+b') as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      for line in capture.read().decode(errors='replace').splitlines():
        if not _LIBTPU_NOISE.search(line):
          print(line, file=sys.stderr)


def topology_devices(topology: str) -> tuple[list[Any], Chip]:
  """The devices of a TPU slice described by `topology` (no TPU needed; libtpu is)."""
  chip, _ = parse_topology(topology)
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover - part of jax
    raise RuntimeError('jax.experimental.topologies is missing from this jax') from e
  # libtpu takes a host-wide lock when it loads, which would serialise compiles (and fail a
  # second one); compiling touches no TPU, so sharing is safe.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  # v4's two TensorCores per chip run as one JAX device (megacore), as on a v4 TPU VM; libtpu's
  # topology would otherwise list one device per core, which JAX's meshes refuse.
  options = {'chip_config_name': 'megacore'} if topology.startswith('v4:') else {}
  try:
    with _libtpu_noise_filtered():
      desc = topologies.get_topology_desc(topology_name=topology, platform='tpu', **options)
  except Exception as e:
    raise ValueError(
      f'cannot describe TPU topology {topology!r}: {e}. Compiling for a TPU needs libtpu: '
      'pip install -e ".[tpu]" (jax[tpu] at the installed jax version). Slices must be whole '
      'hosts (e.g. v5e:2x2 or larger, v4:2x2x1 or larger).'
    ) from e
  return list(desc.devices), chip


def resolve_scan_impl(config: ConfigDict) -> str:
  """The scan impl the model uses on a TPU for `config.model.scan_impl`."""
  impl = config.model.scan_impl
  return scan_lib.resolve_auto(0, 0, platform='tpu') if impl == 'auto' else impl


def _batch_structs(mesh, batch: int, image_size: int, eval_batch: bool) -> dict[str, Any]:
  sharding = sharding_lib.batch_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  keys = builders.EVAL_KEYS if eval_batch else builders.TRAIN_KEYS
  dtypes = {
    'image': ((batch, image_size, image_size, 3), jnp.uint8),
    'label': ((batch,), jnp.int32),
    'mask': ((batch,), jnp.bool_),
    'num_skipped': ((batch,), jnp.int32),
  }
  return {k: spec(*dtypes[k]) for k in keys}


def _with_shardings(abstract: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _shape_bytes(text: str) -> int:
  """Bytes of an HLO result shape such as 'f32[64,128]{1,0}' or '(bf16[8], f32[2,2])'."""
  sizes = {'f64': 8, 's64': 8, 'u64': 8, 'f32': 4, 's32': 4, 'u32': 4, 'bf16': 2, 'f16': 2}
  sizes.update({'s16': 2, 'u16': 2, 's8': 1, 'u8': 1, 'pred': 1, 'f8e4m3fn': 1, 'f8e5m2': 1})
  total = 0
  for dtype, dims in re.findall(r'([a-z0-9]+)\[([0-9,]*)\]', text):
    if dtype in sizes:
      total += sizes[dtype] * int(np.prod([int(d) for d in dims.split(',') if d] or [1]))
  return total


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collectives of a compiled (partitioned) HLO module: {kind: {'count', 'bytes'}}.

  bytes: the per-device size of each collective's result (the last tuple element for async
  all-gather / collective-permute starts, whose tuple also holds the operand), summed.
  """
  counts: Counter = Counter()
  nbytes: Counter = Counter()
  pattern = re.compile(r'=\s*(\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+([a-z-]+)\(')
  for line in hlo_text.splitlines():
    match = pattern.search(line)
    if not match:
      continue
    shape, opcode = match.groups()
    kind = opcode[: -len('-start')] if opcode.endswith('-start') else opcode
    if kind not in COLLECTIVES or opcode.endswith('-done'):
      continue
    if opcode.endswith('-start') and kind in ('all-gather', 'collective-permute'):
      parts = re.findall(r'[a-z0-9]+\[[0-9,]*\]', shape)
      shape = parts[-1] if parts else shape
    counts[kind] += 1
    nbytes[kind] += _shape_bytes(shape)
  return {k: {'count': counts[k], 'bytes': nbytes[k]} for k in COLLECTIVES if counts[k]}


def _memory(compiled) -> dict[str, int]:
  m = compiled.memory_analysis()
  args, out, temp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = m.alias_size_in_bytes  # donated inputs reused as outputs are counted once
  return {
    'arguments': int(args),
    'outputs': int(out),
    'temporaries': int(temp),
    'aliased': int(alias),
    'generated_code': int(m.generated_code_size_in_bytes),
    'total': int(args + out + temp - alias + m.generated_code_size_in_bytes),
  }


def _cost(compiled) -> dict[str, float]:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {
    'flops': float(analysis.get('flops', 0.0)),
    'bytes_accessed': float(analysis.get('bytes accessed', 0.0)),
    'transcendentals': float(analysis.get('transcendentals', 0.0)),
  }


def _is_out_of_memory(error: Exception) -> bool:
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Ran out of memory' in text or 'out of memory' in text


def compile_for_topology(
  config: ConfigDict, topology: str, *, per_chip_batch: int | None = None, with_eval: bool = True
) -> dict[str, Any]:
  """Compiles `config`'s train (and eval) step for the TPU slice `topology`; returns a report.

  Args:
    config: a training config (vcmamba_jax/configs/*.py); its mesh, model, optimizer and augmentation are
      used as `main.py` would use them. `config.model.scan_impl='auto'` means the TPU's choice.
    topology: e.g. 'v5e:16x16' (see `parse_topology`).
    per_chip_batch: overrides config.global_batch_size (and eval_batch_size) with this many
      images per chip; default: the config's global batch, which must divide by the chips.
    with_eval: also compile the eval step (raw + EMA weights, as main.py evaluates).

  Returns:
    A JSON-able dict: topology, chips, chip kind, mesh, per-chip batch, memory per chip of the
    train step (arguments, outputs, temporaries, total) against HBM, fits, FLOPs and bytes per
    step and chip, collectives, a roofline step-time estimate, scan_impl, compile seconds, the
    parameter/optimizer bytes per chip, and the same for the eval step.
  """
  devices, chip = topology_devices(topology)
  num_chips = len(devices)
  config = ConfigDict(config.to_dict())  # unlocked copy: the batch and scan impl may change
  if per_chip_batch is not None:
    if per_chip_batch < 1:
      raise ValueError(f'per_chip_batch must be >= 1, got {per_chip_batch}')
    config.global_batch_size = per_chip_batch * num_chips
    config.eval_batch_size = per_chip_batch * num_chips
  for name in ('global_batch_size', 'eval_batch_size'):
    if config[name] < 1 or config[name] % num_chips:
      raise ValueError(
        f'config.{name}={config[name]} does not divide over the {num_chips} chips of '
        f'{topology}; use a multiple of {num_chips} (e.g. --per_chip_batch=N sets '
        f'{num_chips}*N).'
      )
  builders.check_compiler(config, devices[0].device_kind)
  scan_impl = resolve_scan_impl(config)
  config.model.scan_impl = scan_impl
  mesh = sharding_lib.create_mesh(config.mesh.fsdp, devices=devices)

  # As train_and_evaluate: model, optimizer and the sharded state, from shapes only.
  steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // config.global_batch_size)
  model = builders.build_model(config)
  schedule = optim.learning_rate_schedule(config, steps_per_epoch)
  tx = optim.create_optimizer(config, schedule)
  init = state_lib.make_initializer(
    model, tx, image_size=config.model.img_size, use_ema=config.ema_decay > 0
  )
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  shardings = sharding_lib.state_shardings(mesh, abstract_state, config.mesh.fsdp_min_size)
  state_structs = _with_shardings(abstract_state, shardings)

  model_kwargs = builders.model_kwargs(config)
  report: dict[str, Any] = {
    'topology': topology,
    'chips': num_chips,
    'chip_kind': devices[0].device_kind,
    'model': config.model.name,
    'dtype': config.model.dtype,
    'mesh': {k: int(v) for k, v in mesh.shape.items()},
    'global_batch': int(config.global_batch_size),
    'per_chip_batch': int(config.global_batch_size // num_chips),
    'scan_impl': scan_impl,
    'remat_scan': bool(config.model.remat_scan),
    'scan_blocks': model_kwargs['scan_blocks'],
    'remat_mlp': model_kwargs['remat_mlp'],
    'jax': jax.__version__,
    'libtpu': builders.libtpu_version() or 'unknown',
    'hbm_per_chip': chip.hbm_bytes,
    'state_bytes': _per_chip_bytes(abstract_state),
    'params_opt_bytes': _per_chip_bytes((abstract_state.params, abstract_state.opt_state)),
    'state_bytes_per_chip': _per_chip_bytes(abstract_state, shardings),
    'params_opt_bytes_per_chip': _per_chip_bytes(
      (abstract_state.params, abstract_state.opt_state),
      (shardings.params, shardings.opt_state),
    ),
  }

  teacher = _abstract_teacher(config, mesh)
  report['distillation'] = distillation.distillation_type(config)
  train_step = builders.jit_train_step(model, tx, schedule, config, mesh, shardings, teacher)
  batch = _batch_structs(mesh, config.global_batch_size, config.model.img_size, False)
  teacher_args = teacher.variables if teacher else {}
  report['train'], compiled = _compile(train_step, (state_structs, batch, teacher_args), chip)
  report['fits'] = report['train']['fits']
  if compiled is not None:  # what the executable's own input shardings put on each chip
    state_in = compiled.input_shardings[0][0]
    report['train']['params_opt_bytes_per_chip'] = _per_chip_bytes(
      (abstract_state.params, abstract_state.opt_state), (state_in.params, state_in.opt_state)
    )

  if with_eval:
    eval_shardings = {'': {'params': shardings.params, 'batch_stats': shardings.batch_stats}}
    if shardings.ema:
      eval_shardings['ema'] = shardings.ema
    weights = _with_shardings(
      jax.eval_shape(lambda s: s.eval_weights(), abstract_state), eval_shardings
    )
    replicated = sharding_lib.replicated(mesh)
    sums = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
      steps.init_eval_sums(list(eval_shardings)),
    )
    eval_step = builders.jit_eval_step(model, mesh, eval_shardings)
    eval_batch = _batch_structs(mesh, config.eval_batch_size, config.model.img_size, True)
    report['eval'], _ = _compile(eval_step, (weights, eval_batch, sums), chip)
    report['fits'] = report['fits'] and report['eval']['fits']
  return report


def _abstract_teacher(config: ConfigDict, mesh) -> distillation.Teacher | None:
  """`distillation.load_teacher`'s Teacher with shapes instead of weights (no file needed)."""
  distillation.check_config(config)
  if distillation.distillation_type(config) == 'none':
    return None
  model, abstract, shardings = distillation.teacher_layout(config, mesh)
  return distillation.Teacher(
    config.distillation.teacher,
    model,
    _with_shardings(abstract, shardings),
    shardings,
    'shapes only',
    '',
  )


def _per_chip_bytes(abstract: Any, shardings: Any | None = None) -> int:
  """Bytes of `abstract`'s arrays on one chip under `shardings` (None: the whole arrays)."""
  leaves = jax.tree.leaves(abstract)
  shards = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)
  total = 0
  for leaf, sharding in zip(leaves, shards):
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
  return total


def _compile(jitted, args: tuple, chip: Chip) -> tuple[dict[str, Any], Any]:
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_seconds = time.perf_counter() - start
  try:
    compiled = lowered.compile()
  except Exception as e:
    if not _is_out_of_memory(e):
      raise
    return {
      'fits': False,
      'error': str(e).strip().splitlines()[0][:500],
      'compile_seconds': time.perf_counter() - start,
    }, None
  seconds = time.perf_counter() - start
  memory = _memory(compiled)
  cost = _cost(compiled)
  compute_s = cost['flops'] / (chip.peak_bf16_tflops * 1e12)
  memory_s = cost['bytes_accessed'] / (chip.hbm_gbytes_per_s * 1e9)
  return {
    'fits': memory['total'] <= chip.hbm_bytes,
    'memory': memory,
    **cost,
    'collectives': hlo_collectives(compiled.as_text()),
    # Roofline: the step cannot be faster than its FLOPs at the chip's bf16 peak or its HBM
    # traffic at the chip's bandwidth; real steps are slower (MXU/VPU utilisation, collectives).
    'step_time_lower_bound_s': max(compute_s, memory_s),
    'bound_by': 'compute' if compute_s >= memory_s else 'hbm',
    'compile_seconds': seconds,  # tracing + lowering (Mosaic kernels included) + XLA compile
    'lower_seconds': lower_seconds,
  }, compiled


def _size(nbytes: float) -> str:
  return f'{nbytes / GiB:.2f} GiB' if nbytes >= 0.1 * GiB else f'{nbytes / 2**20:.1f} MiB'


def format_report(report: dict[str, Any]) -> str:
  """A human-readable table of `compile_for_topology`'s report."""
  gib = _size
  lines = [
    f'{report["model"]} ({report["dtype"]}, distillation {report["distillation"]}) on '
    f'{report["topology"]}: {report["chips"]} x '
    f'{report["chip_kind"]}, mesh {report["mesh"]}, {report["per_chip_batch"]} images per chip '
    f'(global {report["global_batch"]}), scan {report["scan_impl"]}; jax '
    f'{report.get("jax", "?")}, libtpu {report.get("libtpu", "?")}',
    f'params + optimizer per chip: {gib(report["params_opt_bytes_per_chip"])}; whole train state '
    f'per chip: {gib(report["state_bytes_per_chip"])}',
  ]
  header = f'{"step":<6} {"args":>10} {"temps":>10} {"outputs":>10} {"total":>10} {"HBM":>10}'
  header += f' {"fits":>5} {"GFLOP":>9} {"GB moved":>9} {"t_min ms":>9} {"compile s":>9}'
  lines.append(header)
  for name in ('train', 'eval'):
    r = report.get(name)
    if r is None:
      continue
    if 'memory' not in r:
      lines.append(f'{name:<6} does not fit: {r["error"]}')
      continue
    m = r['memory']
    lines.append(
      f'{name:<6} {gib(m["arguments"]):>10} {gib(m["temporaries"]):>10} {gib(m["outputs"]):>10} '
      f'{gib(m["total"]):>10} {gib(report["hbm_per_chip"]):>10} {str(r["fits"]):>5} '
      f'{r["flops"] / 1e9:>9.2f} {r["bytes_accessed"] / 1e9:>9.2f} '
      f'{r["step_time_lower_bound_s"] * 1e3:>9.1f} {r["compile_seconds"]:>9.1f}'
    )
    for kind, c in r['collectives'].items():
      lines.append(f'       {kind}: {c["count"]} ops, {c["bytes"] / 2**20:.1f} MiB per chip')
  return '\n'.join(lines)


def markdown_table(reports: list[dict[str, Any]]) -> str:
  """README table of recorded reports (one row each; see scripts/aot_compile.py --table_from)."""
  gib = _size
  rows = [
    '| model | teacher | slice | mesh | dtype | batch/chip | scan | params+opt/chip | '
    'train memory/chip (HBM) | fits | '
    'GFLOP/step/chip | GB moved/step/chip | step-time bound | all-reduce MiB/chip | compile s |',
    '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in reports:
    t = r['train']
    mesh = 'fsdp' if r['mesh'].get('fsdp', 1) > 1 else 'data'
    chips, prefix = r['chips'], r['topology'].split(':')[0]
    # Cloud TPU names count TensorCores for v4/v5p (2 per chip), chips for v5e/v6e.
    slice_name = f'{prefix}-{chips * (2 if prefix in ("v4", "v5p") else 1)}'
    teacher = 'none' if r.get('distillation', 'none') == 'none' else r['distillation']
    if 'memory' not in t:
      rows.append(
        f'| {r["model"]} | {teacher} | {slice_name} | {mesh} | {r["dtype"]} | {r["per_chip_batch"]} | '
        f'{r["scan_impl"]} | {gib(r["params_opt_bytes_per_chip"])} | out of memory | False | | | '
        f'| | {t["compile_seconds"]:.0f} |'
      )
      continue
    allreduce = t['collectives'].get('all-reduce', {}).get('bytes', 0) / 2**20
    rows.append(
      f'| {r["model"]} | {teacher} | {slice_name} | {mesh} | {r["dtype"]} | {r["per_chip_batch"]} | '
      f'{r["scan_impl"]} | {gib(r["params_opt_bytes_per_chip"])} | '
      f'{gib(t["memory"]["total"])} ({gib(r["hbm_per_chip"])}) | '
      f'{r["fits"]} | {t["flops"] / 1e9:.2f} | {t["bytes_accessed"] / 1e9:.2f} | '
      f'{t["step_time_lower_bound_s"] * 1e3:.2f} ms ({t["bound_by"]}) | {allreduce:.1f} | '
      f'{t["compile_seconds"]:.0f} |'
    )
  return '\n'.join(rows)


# Slices of the README's TPU table: Cloud TPU name -> topology.
README_SLICES = {
  'v4-32': 'v4:2x2x4',
  'v5e-64': 'v5e:8x8',
  'v5e-256': 'v5e:16x16',
  'v5p-128': 'v5p:4x4x4',
  'v6e-64': 'v6e:8x8',
}


def estimate_capacity(
  report: dict[str, Any],
  topology: str,
  *,
  fsdp: bool,
  second: dict[str, Any] | None = None,
  headroom: float = 0.9,
  multiple: int = 8,
) -> dict[str, Any]:
  """Largest per-chip train batch that fits ``topology`` and its step-time bound, extrapolated
  from one compiled train step (``report``, of the same model and dtype on any slice).

  The model: a compiled step's per-chip memory is a fixed part (arguments, outputs, code: the
  train state) plus temporaries linear in the per-chip batch (activations), which holds for
  data parallelism because each chip runs the same program on its own images, whatever the
  slice. With fsdp over all chips, the state part shrinks by (1 - 1/chips) of the train state
  (arrays below ``mesh.fsdp_min_size`` stay whole: an upper bound of the saving). The batch is
  the largest multiple of ``multiple`` within ``headroom`` of the chip's HBM. FLOPs and HBM
  bytes per image are the compiled step's; the bound is max(FLOPs / bf16 peak, bytes / HBM
  bandwidth) at that batch (no collectives, no kernel-internal work of the Pallas scan).

  With one compile the temporaries are taken as proportional to the batch, which overestimates
  them (XLA's buffer reuse makes them grow more slowly: B on v5e at 128/chip compiled to 12.4 GiB
  where proportionality says 14.0), so the batch is conservative. With a ``second`` compile at
  another batch, the line through both points is used instead.
  """
  chip, chips = parse_topology(topology)
  train = report['train']
  batch = report['per_chip_batch']
  memory = train['memory']
  per_image = memory['temporaries'] / batch
  fixed = memory['total'] - memory['temporaries']
  if second is not None and second['per_chip_batch'] != batch:
    other = second['train']['memory']['total']
    per_image = (other - memory['total']) / (second['per_chip_batch'] - batch)
    fixed = memory['total'] - per_image * batch
  if fsdp:
    fixed -= report['state_bytes_per_chip'] * (1 - 1 / chips)
  budget = headroom * chip.hbm_bytes - fixed
  max_batch = int(budget // per_image) // multiple * multiple if budget > 0 else 0
  flops = train['flops'] / batch * max_batch
  moved = train['bytes_accessed'] / batch * max_batch
  compute_s = flops / (chip.peak_bf16_tflops * 1e12)
  memory_s = moved / (chip.hbm_gbytes_per_s * 1e9)
  step_s = max(compute_s, memory_s)
  return {
    'model': report['model'],
    'topology': topology,
    'chips': chips,
    'mesh': 'fsdp' if fsdp else 'data',
    'per_chip_batch': max_batch,
    'memory_per_chip': fixed + per_image * max_batch,
    'hbm_per_chip': chip.hbm_bytes,
    'gflop_per_step_chip': flops / 1e9,
    'step_time_bound_s': step_s,
    'bound_by': 'compute' if compute_s >= memory_s else 'hbm',
    'img_per_s_bound': chips * max_batch / step_s if step_s else 0.0,
    'from': f'{report["topology"]} at {batch}/chip',
  }


def capacity_table(
  reports: list[dict[str, Any]],
  slices: dict[str, str] = README_SLICES,
  distillation: str = 'soft',
) -> str:
  """README table: for each model and slice, ``estimate_capacity`` from the compiled bf16
  report (train step with ``distillation``, the recipe's by default) of the same chip
  generation where one exists (else of another generation, marked), data parallel and fsdp
  over all chips."""
  rows = [
    '| model | slice | mesh | max batch/chip (est.) | memory/chip (HBM) | GFLOP/step/chip | '
    'step-time bound | img/s bound (slice) | from the compile of |',
    '|---|---|---|---|---|---|---|---|---|',
  ]
  by_model: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for r in reports:
    if (
      'memory' in r.get('train', {})
      and r.get('dtype') == 'bfloat16'
      and r.get('distillation', 'none') == distillation
      and r['mesh'].get('fsdp', 1) == 1
    ):
      by_model.setdefault(r['model'], {}).setdefault(r['topology'].split(':')[0], []).append(r)
  for model in sorted(by_model):
    for name, topology in slices.items():
      generation = topology.split(':')[0]
      found = by_model[model].get(generation) or next(iter(by_model[model].values()))
      found = sorted(found, key=lambda r: r['per_chip_batch'])
      source, second = found[0], (found[-1] if len(found) > 1 else None)
      for fsdp in (False, True):
        e = estimate_capacity(source, topology, fsdp=fsdp, second=second)
        if second is not None and second['per_chip_batch'] != source['per_chip_batch']:
          e['from'] += f' and {second["per_chip_batch"]}/chip'
        mark = '' if source['topology'].startswith(generation + ':') else ' (other chip)'
        rows.append(
          f'| {model} | {name} | {e["mesh"]} | {e["per_chip_batch"]} | '
          f'{_size(e["memory_per_chip"])} ({_size(e["hbm_per_chip"])}) | '
          f'{e["gflop_per_step_chip"]:.0f} | {e["step_time_bound_s"] * 1e3:.0f} ms '
          f'({e["bound_by"]}) | {e["img_per_s_bound"]:,.0f} | {e["from"]}{mark} |'
        )
  return '\n'.join(rows)
