r"""Memory of one VCMamba-B Mamba layer's selective scan (forward + backward, rematerialised as
in the model) per scan impl, compiled for one TPU v5e chip on this host (needs libtpu):

  python scripts/aot_scan_memory.py   # writes docs/tpu_scan_memory_v5e.json

Shapes: batch 64, 4 directions, 7x7 = 49 tokens, E = 1024 channels, d_state 16, bfloat16 inputs
(upstream layout: delta and C shared by the four directions).
"""

import json
import os
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vcmamba_jax.models import scan

topo = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu')
mesh = Mesh(np.array(topo.devices[:1]), ('x',))
rep = NamedSharding(mesh, P())
b, L, E, N = 64, 49, 1024, 16
S = jax.ShapeDtypeStruct
dt = jnp.bfloat16
args = (
  S((b, 4, L, E), dt),
  S((b, 1, L, E), dt),
  S((E, N), jnp.float32),
  S((b, 4, L, N), jnp.float32),
  S((b, 1, L, N), dt),
  S((E,), jnp.float32),
  S((E,), jnp.float32),
)
out = {}
for impl in ['pallas_tpu', 'chunked', 'associative']:

  def loss(*a, impl=impl):
    return jnp.sum(scan.selective_scan_remat(*a, impl=impl).astype(jnp.float32) ** 2)

  f = jax.grad(loss, argnums=tuple(range(7)))
  t = time.time()
  c = jax.jit(f, in_shardings=(rep,) * 7).lower(*args).compile()
  m = c.memory_analysis()
  ca = c.cost_analysis()
  out[impl] = dict(
    temp=m.temp_size_in_bytes,
    args=m.argument_size_in_bytes,
    out=m.output_size_in_bytes,
    bytes_accessed=ca.get('bytes accessed'),
    seconds=time.time() - t,
  )
  print(impl, out[impl], flush=True)
with open('docs/tpu_scan_memory_v5e.json', 'w') as f:
  json.dump(out, f, indent=1)
