r"""Trains or evaluates VCMamba. Kept short: the logic lives in `vcmamba_jax.train` (importable
from a notebook: `vcmamba_jax.train.run(config, workdir)`).

  python main.py --config=configs/digits.py --workdir=runs/digits
  python main.py --config=configs/vcmamba_b.py --workdir=runs/b --config.data.data_dir=DIR
  python main.py --config=configs/vcmamba_b.py --workdir=runs/b --config.mode=eval

Rerunning a command with the same --workdir resumes from its latest checkpoint. Any config field
can be overridden with --config.<field>=<value>; unknown fields are errors.
"""

from absl import app, flags
from ml_collections import config_flags

import vcmamba_jax.train

_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Path to a config file, e.g. configs/vcmamba_b.py[:smoke].', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  vcmamba_jax.train.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
