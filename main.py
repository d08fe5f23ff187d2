r"""Trains or evaluates VCMamba. Kept short: the logic lives in `vcmamba_jax.train` (importable
from a notebook: `vcmamba_jax.train.run(config, workdir)`).

  python main.py --config=vcmamba_jax/configs/digits.py --workdir=runs/digits
  python main.py --config=vcmamba_jax/configs/vcmamba_b.py --workdir=runs/b --config.data.data_dir=DIR
  python main.py --config=vcmamba_jax/configs/vcmamba_b.py --workdir=runs/b --config.mode=eval

Rerunning a command with the same --workdir resumes from its latest intact checkpoint. Any
config field can be overridden with --config.<field>=<value>; unknown fields are errors.

Exit codes: 0 done; 1 an error (one line on stderr; --verbose or VCMAMBA_VERBOSE=1 adds the
traceback); 2 an invalid config or command line (nothing was written); 75 preempted or
interrupted by SIGTERM / the first Ctrl-C, the current step was saved: rerun to resume
(EX_TEMPFAIL, the code to requeue on); 130 a second Ctrl-C (stopped at once, not saved).
"""

import os
import sys
import traceback

from absl import app, flags
from ml_collections import config_flags

# Only the lazy top-level package here: grain starts its worker processes with 'spawn', which
# re-runs this file's top level in every worker; `vcmamba_jax.train` (jax, flax, orbax, the
# models) is imported by the first `vcmamba_jax.train` lookup in main(), in this process only.
import vcmamba_jax

_CONFIG = config_flags.DEFINE_config_file(
  'config',
  None,
  'Path to a config file, e.g. vcmamba_jax/configs/vcmamba_b.py[:smoke].',
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
_VERBOSE = flags.DEFINE_bool(
  'verbose', False, 'Print the traceback of an error (also: VCMAMBA_VERBOSE=1).'
)
flags.mark_flags_as_required(['config', 'workdir'])

EXIT_ERROR = 1
EXIT_CONFIG = 2


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _VERBOSE.value:
    os.environ['VCMAMBA_VERBOSE'] = '1'  # library tracebacks too (see metrics.quiet_library_logs)
  try:
    result = vcmamba_jax.train.run(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt:  # Ctrl-C before the training loop watches for it
    print('main.py: interrupted before training started; nothing was saved.', file=sys.stderr)
    sys.exit(vcmamba_jax.checkpoint.EXIT_INTERRUPTED)
  except Exception as e:
    if _VERBOSE.value or os.environ.get('VCMAMBA_VERBOSE', '') not in ('', '0'):
      traceback.print_exc()
    else:
      print(
        f'main.py: error: {e} (--verbose or VCMAMBA_VERBOSE=1 shows the traceback)',
        file=sys.stderr,
      )
    sys.exit(EXIT_CONFIG if isinstance(e, vcmamba_jax.train.validate.ConfigError) else EXIT_ERROR)
  if result.get('preempted'):
    sys.exit(vcmamba_jax.checkpoint.EXIT_PREEMPTED)


if __name__ == '__main__':
  app.run(main)
