"""Experiment configs: `python main.py --config=vcmamba_jax/configs/<name>.py[:smoke] --workdir=DIR`."""
