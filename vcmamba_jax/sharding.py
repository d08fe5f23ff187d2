"""Device mesh, shardings and global arrays.

The mesh has two axes:

* ``data``: pure data parallelism. Batches are split along it; parameters are replicated.
* ``fsdp``: fully sharded data parallelism. Batches are split along it too, and every parameter
  (and its optimiser state and EMA copy) large enough to matter is split along its largest
  dimension that the axis size divides. Everything else is replicated.

With ``fsdp=1`` (the default, right for a 10-30M parameter model) this is plain data parallelism.
XLA inserts the all-gathers / reduce-scatters that FSDP needs from the shardings alone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
# Batches are split over every device: over `data` and, inside each data replica, over `fsdp`.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def create_mesh(fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a ``('data', 'fsdp')`` mesh over `devices` (default: all devices of all hosts).

  Args:
    fsdp: size of the ``fsdp`` axis; ``-1`` puts every device on it. The ``data`` axis takes the
      remaining factor.
    devices: the devices to use, e.g. ``jax.devices()[:1]`` in tests.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  if fsdp == -1:
    fsdp = num_devices
  if fsdp < 1 or num_devices % fsdp:
    raise ValueError(
      f'mesh.fsdp={fsdp} must divide the number of devices ({num_devices}); '
      f'pick a divisor of {num_devices} or -1 for all devices.'
    )
  return jax.make_mesh(
    (num_devices // fsdp, fsdp),
    BATCH_AXES,
    axis_types=(AxisType.Auto, AxisType.Auto),
    devices=devices,
  )


def traced_under_mesh(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` traced with `mesh` as the abstract mesh context, for code that must know the mesh
  while tracing: the Pallas TPU scan wraps its kernels in a `shard_map` over it (XLA cannot
  partition Mosaic kernels). Wrap a function before `jax.jit`-ing it."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped


def per_device(fn: Callable, *operands: jax.Array, batched: Sequence[bool]):
  """``fn(*operands)`` computed on each device's share of the batch: a `shard_map` over every
  axis of the mesh being traced under (`traced_under_mesh`), for Pallas kernels, which XLA
  cannot partition (given batch-split operands it gathers the whole batch onto every device and
  runs the kernel there: each device computes every device's share).

  The operands flagged in `batched` are split on their leading axis (the batch, as the trainer
  splits batches; one of length 1 broadcasts and is replicated), the others replicated; every
  output of ``fn`` must have the batch as its leading axis (per-example results or partial
  sums, reduced outside). Without a mesh, with one device or a batch the mesh does not divide
  (e.g. model.init's single image): ``fn(*operands)``.
  """
  batch = next(x.shape[0] for x, b in zip(operands, batched, strict=True) if b)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or batch % mesh.size:
    return fn(*operands)
  split = P(tuple(mesh.axis_names))
  specs = tuple(split if b and x.shape[0] == batch else P() for x, b in zip(operands, batched))
  return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=split, check_vma=False)(*operands)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array with a full copy on every device."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch array: leading (batch) axis split over all devices."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_partition_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 0) -> P:
  """Partition spec that splits the largest dimension of `shape` divisible by `fsdp_size`.

  Arrays with fewer than `min_size` elements, or with no divisible dimension, are replicated:
  gathering a tiny array costs more latency than its memory is worth.
  """
  if fsdp_size == 1 or not shape or int(np.prod(shape)) < max(min_size, 1):
    return P()
  # Largest dimension first; among equal sizes the last one (channels in NHWC kernels).
  for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = FSDP_AXIS
      return P(*spec)
  return P()


def state_shardings(mesh: Mesh, abstract_tree: Any, fsdp_min_size: int = 0) -> Any:
  """`NamedSharding` for every leaf of `abstract_tree` (arrays or ``jax.ShapeDtypeStruct``).

  The rule depends only on the leaf's shape, so a parameter, its Adam moments and its EMA copy
  always get the same sharding. With an ``fsdp`` axis of size 1 everything is replicated.
  """
  fsdp_size = mesh.shape[FSDP_AXIS]
  return jax.tree.map(
    lambda leaf: NamedSharding(mesh, fsdp_partition_spec(leaf.shape, fsdp_size, fsdp_min_size)),
    abstract_tree,
  )


def make_global_batch(mesh: Mesh, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
  """Assembles per-process batches into global arrays split over all devices.

  Args:
    mesh: the training mesh.
    local_batch: this process's share, e.g. ``{'image': uint8 [local_batch, H, W, 3],
      'label': int32 [local_batch]}``; every process passes the same keys, shapes and dtypes.

  Returns:
    The same keys as global ``jax.Array`` s of leading size ``local_batch * process_count``.
  """
  sharding = batch_sharding(mesh)
  num_shards = mesh.devices.size // jax.process_count()
  out = {}
  for key, value in local_batch.items():
    value = np.asarray(value)
    if value.shape[0] % num_shards:
      raise ValueError(
        f'local batch of {value.shape[0]} ({key!r}) is not divisible by the {num_shards} local '
        'devices; choose a global batch size divisible by the number of devices.'
      )
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
