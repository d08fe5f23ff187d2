"""What the Pallas/Triton GPU kernels (`scan_pallas`, `depthwise_pallas`) share: their compiler
parameters, the probe that decides, once per process, whether a kernel can run here, and their
multiply-adds as one PTX instruction (`fma`)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def compiler_params(num_warps: int, num_stages: int = 1):
  """Triton launch parameters (num_stages > 1: Triton's software pipelining of a kernel's loop
  loads). Pallas's Triton backend is deprecated from JAX 0.11 (Mosaic GPU is its successor);
  older releases named the class TritonCompilerParams."""
  from jax.experimental.pallas import triton as plgpu

  params = getattr(plgpu, 'CompilerParams', None) or plgpu.TritonCompilerParams
  return params(num_warps=num_warps, num_stages=num_stages)


def probe(run: Callable[[], object], kernel: str, fallback: str) -> bool:
  """Calls `run` (which compiles and runs the kernel on tiny inputs); True if it works, else False
  with one logged line naming the `fallback` that callers then use, never an exception. The
  inline-fma check (`ptx_fma_works`) runs first, so that it never runs from inside a kernel
  being traced."""
  ptx_fma_works()
  return _attempt(run, kernel, fallback)


def _attempt(run: Callable[[], object], kernel: str, fallback: str) -> bool:
  try:
    run()
    return True
  except Exception as e:
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    logging.warning(
      'vcmamba_jax: the %s is unavailable with jax %s (%s: %s); using %s instead.',
      kernel,
      jax.__version__,
      type(e).__name__,
      first_line,
      fallback,
    )
    return False


def fma(a: jax.Array, b: jax.Array, c: jax.Array, in_ptx: bool) -> jax.Array:
  """a * b + c (float32, broadcast); with `in_ptx`, inside a kernel on a GPU where the check
  `ptx_fma_works` passed, rounded once as PTX `fma.rn.f32` (inline assembly, which the
  interpreter cannot run), else a * b + c.

  Pallas's Triton lowering emits a product and a sum as `mul.rn.f32` and `add.rn.f32`, whose
  explicit rounding ptxas may not contract: two instructions per multiply-add in kernels that
  are instruction-bound (deviceless PTX of B's kernels: the depthwise 3x3 backward issued 14.5
  instructions per byte it moves, where an H100 SM can issue ~8.8)."""
  if not (in_ptx and ptx_fma_works()):
    return a * b + c
  return _ptx_fma(a, b, c)


def _ptx_fma(a, b, c):
  from jax.experimental.pallas import triton as plgpu

  a, b, c = jnp.broadcast_arrays(a, b, c)
  [out] = plgpu.elementwise_inline_asm(
    'fma.rn.f32 $0, $1, $2, $3;',
    args=[a, b, c],
    constraints='=f,f,f,f',
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.float32)],
  )
  return out


@functools.cache
def ptx_fma_works() -> bool:
  """Whether the inline `fma.rn.f32` computes a * b + c on this GPU and JAX: a tiny kernel, its
  result compared with numpy's, once per process. False (on other backends, or with one logged
  line where it fails or differs): the kernels then multiply and add separately, never a silent
  wrong result. Callers may be tracing: nothing here applies a JAX op to a result."""
  if jax.default_backend() != 'gpu':
    return False

  def check():
    from jax.experimental import pallas as pl

    def kernel(a_ref, b_ref, c_ref, o_ref):
      o_ref[...] = _ptx_fma(a_ref[...], b_ref[...], c_ref[...])

    a, b, c = np.random.default_rng(0).standard_normal((3, 16, 16)).astype(np.float32)
    spec = jax.ShapeDtypeStruct(a.shape, jnp.float32)
    call = pl.pallas_call(kernel, out_shape=spec, compiler_params=compiler_params(1))
    got = np.asarray(jax.jit(call).lower(spec, spec, spec).compile()(a, b, c))
    want = a.astype(np.float64) * b + c
    if not np.allclose(got, want, rtol=1e-6, atol=1e-6):
      raise ValueError(f'fma.rn.f32 gave {got.ravel()[:3]}, expected {want.ravel()[:3]}')

  return _attempt(check, 'inline PTX fma', 'separate multiplies and adds')
