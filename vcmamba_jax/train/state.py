"""Train state and its shape-first, sharded creation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from vcmamba_jax import sharding as sharding_lib


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; checkpointed as one pytree.

  Attributes:
    step: int32 [], number of completed updates (the step shown in logs after the update).
    params: float32 model parameters.
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state (AdamW moments and count).
    ema: exponential moving average of {'params', 'batch_stats'} ({} when the EMA is off).
    rng: raw uint32 [2] PRNG key; step s draws its randomness from fold_in(rng, s).
    skipped_updates: int32 [], non-finite updates that were not applied.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema: Any
  rng: jax.Array
  skipped_updates: jax.Array

  def variables(self) -> dict[str, Any]:
    """The raw weights as model variables."""
    return {'params': self.params, 'batch_stats': self.batch_stats}

  def eval_weights(self) -> dict[str, dict[str, Any]]:
    """Weight sets to evaluate: '' (raw) and 'ema' when the EMA is on."""
    weights = {'': self.variables()}
    if self.ema:
      weights['ema'] = self.ema
    return weights


def ema_update(ema: Any, new: Any, decay: float) -> Any:
  """ema <- decay * ema + (1 - decay) * new (timm ModelEma v1), leaf by leaf."""
  return optax.incremental_update(new, ema, step_size=1.0 - decay)


def _init_compiler_options() -> dict[str, Any] | None:
  # The init program runs once; on CPU its LLVM optimisation costs more time (tens of seconds for
  # the many random initialisers) than it could ever save.
  return {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None


def make_initializer(
  model: nn.Module, tx: optax.GradientTransformation, *, image_size: int, use_ema: bool
) -> Callable[[jax.Array], TrainState]:
  """`init(rng) -> TrainState`: model init at `image_size`, fresh optimizer state, EMA = weights."""

  def init(rng: jax.Array) -> TrainState:
    params_rng, state_rng = jax.random.split(rng)
    variables = model.init(
      {'params': params_rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False
    )
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    ema = {'params': params, 'batch_stats': batch_stats} if use_ema else {}
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema=ema,
      rng=state_rng,
      skipped_updates=jnp.zeros((), jnp.int32),
    )

  return init


@contextlib.contextmanager
def threefry_kernels() -> Iterator[None]:
  """Programs lowered inside draw their random numbers with JAX's threefry GPU kernel
  (`jax_threefry_gpu_kernel_lowering`): the same bits as the threefry that XLA otherwise expands
  into elementwise code, one kernel per draw. Where hundreds of draws are the whole program (the
  init program: one per parameter), XLA's compile goes from minutes of fusing that code to
  seconds (B on an H100: see `init_sharded`). No effect on other platforms."""
  if jax.default_backend() != 'gpu':
    yield
    return
  previous = jax.config.jax_threefry_gpu_kernel_lowering
  jax.config.update('jax_threefry_gpu_kernel_lowering', True)
  try:
    yield
  finally:
    jax.config.update('jax_threefry_gpu_kernel_lowering', previous)


def init_sharded(
  init: Callable[[jax.Array], TrainState], rng: jax.Array, shardings: TrainState
) -> TrainState:
  """Runs `init` as one jitted program whose outputs are created directly with `shardings`:
  each device only ever holds its own shards and no parameter passes through host memory.

  On GPUs its random initialisers run as threefry kernels (`threefry_kernels`, the same values):
  B's init program, 449 draws, compiled for an H100 in 47 s as expanded threefry and in 8 s
  with the kernels (deviceless compile on a 2-core host); on an H100, the benchmark's state init
  took 41.5 s before and 13.8 s after (2026-12-07, two machines)."""
  mesh = jax.tree.leaves(shardings)[0].mesh
  init = sharding_lib.traced_under_mesh(init, mesh)
  with threefry_kernels():
    return jax.jit(init, out_shardings=shardings, compiler_options=_init_compiler_options())(rng)


def create_train_state(
  model: nn.Module,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  *,
  mesh: Mesh,
  image_size: int,
  use_ema: bool,
  fsdp_min_size: int = 0,
) -> tuple[TrainState, TrainState]:
  """Shape-first sharded init: `jax.eval_shape` (no FLOPs, no memory), shardings from the
  shapes, then `init_sharded`.

  Returns:
    (state, shardings): the state and a TrainState of `NamedSharding`s with the same structure.
  """
  init = make_initializer(model, tx, image_size=image_size, use_ema=use_ema)
  shardings = sharding_lib.state_shardings(mesh, jax.eval_shape(init, rng), fsdp_min_size)
  return init_sharded(init, rng, shardings), shardings


def put_variables(variables: dict[str, Any], shardings: dict[str, Any]) -> dict[str, Any]:
  """Host arrays (e.g. pretrained weights) -> global arrays with the given shardings.

  Works on every process of a multi-host job as long as each passes the same values.
  """

  def put(value, sharding):
    host = np.asarray(jax.device_get(value), np.float32)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(put, variables, shardings)


def with_pretrained(
  state: TrainState, shardings: TrainState, variables: dict[str, Any]
) -> TrainState:
  """`state` with its weights (and EMA) replaced by pretrained `variables` of the same shapes."""
  params = put_variables(variables['params'], shardings.params)
  batch_stats = put_variables(variables['batch_stats'], shardings.batch_stats)
  ema = {}
  if state.ema:
    ema = {
      'params': put_variables(variables['params'], shardings.ema['params']),
      'batch_stats': put_variables(variables['batch_stats'], shardings.ema['batch_stats']),
    }
  return state.replace(params=params, batch_stats=batch_stats, ema=ema)
