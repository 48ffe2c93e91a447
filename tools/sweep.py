"""Run a grid of training runs (model sizes x infusion amounts x budgets) from one sweep file.

    python tools/sweep.py examples/tiny_ladder/sweep.yaml --jobs 2
    python tools/sweep.py SWEEP.yaml --list
    python tools/sweep.py SWEEP.yaml --print-launch slurm > runs.txt

The sweep file format and the behaviour (skip finished runs, resume interrupted ones, largest
model first) are documented in kis_megatron/sweep.py.
"""

import sys

from kis_megatron.sweep import main

if __name__ == "__main__":
    sys.exit(main())
