"""Runs a script with BatchNorm's batch statistics taken in one pass over x (issue 10).

python docs/pending/run_with_one_pass_bn.py scripts/benchmark.py --config=...

Main's `ops.batch_moments` reads x twice (the mean, then the mean of squared deviations). Here both
sums come from one pass, shifted by the first row of x so that E[(x-s)^2] - E[x-s]^2 does not
cancel (s is one sample of each channel, so |mean - s| is of the order of the std): float32 sums
over ~10^5-10^6 values give the variance to a few ulps relative. The unshifted one-pass moved
gradients by 15-50% (2026-12-05); this one is checked against the golden tests before it runs.
"""

from __future__ import annotations

import runpy
import sys

import jax
import jax.numpy as jnp

from vcmamba_jax.models import ops


def shifted_moments(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  shift = jax.lax.stop_gradient(xf[(0,) * (x.ndim - 1)])
  d = xf - shift
  m1 = jnp.mean(d, axis=axes)
  m2 = jnp.mean(jnp.square(d), axis=axes)
  return shift + m1, jnp.maximum(m2 - jnp.square(m1), 0.0)


if __name__ == '__main__':
  ops.batch_moments = shifted_moments
  script, *rest = sys.argv[1:]
  sys.argv = [script, *rest]
  runpy.run_path(script, run_name='__main__')
