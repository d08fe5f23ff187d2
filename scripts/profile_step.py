r"""Top kernels of the train and eval steps by device time, named by the model code they run.

  python scripts/profile_step.py --config=vcmamba_jax/configs/vcmamba_b.py --config.model.dtype=bfloat16 \
      --config.distillation.type=none --config.global_batch_size=128 --config.eval_batch_size=256 \
      --json_out=profile_b.json

Runs the trainer's real jitted train step (augmentation, forward, backward, AdamW, EMA) and the
eval step on synthetic on-device batches under `jax.profiler.trace`, then prints per step: kernel
time by category (convolution, matmul, reduction fusion, elementwise, the Pallas scan, ...),
the top kernels with their HLO instruction and model scope (e.g.
`bwd stage4/block3/mamba/conv2d [conv_general_dilated]`), and the top model scopes. See
`vcmamba_jax/train/profiling.py` for how kernels are mapped to scopes.

XLA's command buffers (CUDA graphs) hide kernels from the profiler, so this process turns them
off (`--xla_gpu_enable_command_buffer=`); the kernel times are those of the benchmark's program
otherwise. `--dump_hlo` writes the compiled modules' text next to the JSON.
"""

from __future__ import annotations

import json
import os
import sys

if '--keep_command_buffers' not in sys.argv:  # must precede the first jax import
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_enable_command_buffer='
  ).strip()

import jax
from absl import app, flags
from ml_collections import config_flags

from vcmamba_jax.train import benchmark as benchmark_lib
from vcmamba_jax.train import metrics as metrics_lib
from vcmamba_jax.train import profiling

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Config file (as for main.py).', lock_config=True
)
_STEPS = flags.DEFINE_integer('steps', 5, 'Profiled steps (after one untraced warm-up step).')
_TOP = flags.DEFINE_integer('top', 30, 'Rows per table.')
_MODES = flags.DEFINE_list('modes', 'train,eval', 'Steps to profile: train, eval.')
_JSON_OUT = flags.DEFINE_string('json_out', None, 'Write the full tables as JSON here.')
_DUMP_HLO = flags.DEFINE_bool(
  'dump_hlo', False, 'Also write the compiled HLO text (with --json_out).'
)
flags.DEFINE_bool('keep_command_buffers', False, 'Leave XLA command buffers on (hides kernels).')
flags.mark_flags_as_required(['config'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics_lib.quiet_library_logs()
  config = _CONFIG.value
  built = benchmark_lib.setup(config)
  mesh, state = built['mesh'], built['state']
  report = {}
  holder = {'state': state}
  if 'train' in _MODES.value:
    batch = benchmark_lib.synthetic_batch(config, mesh, config.global_batch_size, with_mask=False)
    teacher_variables = built['teacher_variables']
    compiled = built['train_step'].lower(state, batch, teacher_variables).compile()

    def train():
      holder['state'], metrics = compiled(holder['state'], batch, teacher_variables)
      return metrics

    hlo = compiled.as_text()
    report['train'] = profiling.profile_compiled(
      train, lambda: (), steps=_STEPS.value, hlo_text=hlo
    )
    title = f'train step, {config.model.name}, batch {config.global_batch_size}'
    print(profiling.format_profile(title, report['train'], _TOP.value), flush=True)
    if _DUMP_HLO.value and _JSON_OUT.value:
      with open(_JSON_OUT.value + '.train.hlo.txt', 'w') as f:
        f.write(hlo)
  if 'eval' in _MODES.value:
    weights = {'': holder['state'].variables()}  # the train step donated `state`
    batch = benchmark_lib.synthetic_batch(config, mesh, config.eval_batch_size, with_mask=True)
    compiled = built['eval_step'].lower(weights, batch, built['eval_sums']).compile()
    hlo = compiled.as_text()
    sums = {'sums': built['eval_sums']}

    def evaluate():
      sums['sums'] = compiled(weights, batch, sums['sums'])  # donates its sums argument
      return sums['sums']

    report['eval'] = profiling.profile_compiled(
      evaluate,
      lambda: (),
      steps=_STEPS.value,
      hlo_text=hlo,
    )
    title = f'eval step, {config.model.name}, batch {config.eval_batch_size}'
    print(profiling.format_profile(title, report['eval'], _TOP.value), flush=True)
    if _DUMP_HLO.value and _JSON_OUT.value:
      with open(_JSON_OUT.value + '.eval.hlo.txt', 'w') as f:
        f.write(hlo)
  if _JSON_OUT.value and jax.process_index() == 0:
    with open(_JSON_OUT.value, 'w') as f:
      json.dump(report, f, indent=1)


if __name__ == '__main__':
  app.run(main)
