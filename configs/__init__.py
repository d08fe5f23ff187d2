"""Experiment configs: `python main.py --config=configs/<name>.py[:smoke] --workdir=DIR`."""
