"""Run a grid of training runs (model sizes x infusion amounts x budgets) from one sweep file.

    python tools/sweep.py examples/tiny_ladder/sweep.yaml --jobs 2
    python tools/sweep.py SWEEP.yaml --list
    python tools/sweep.py SWEEP.yaml --print-launch slurm > runs.txt
    python tools/sweep.py SWEEP.yaml --refine --jobs 2                     # add levels where collapses are unsure
    python tools/sweep.py SWEEP.yaml --refine --print-launch slurm         # one refinement round, then print
    python tools/sweep.py SWEEP.yaml --validate LAW_JSON --print-launch slurm   # larger model at the prediction

The sweep file format (value axes, refine:, validate:) and the behaviour (skip finished runs,
resume interrupted ones, largest model first, refine.json, validation_plan.json) are
documented in kis_megatron/sweep.py.
"""

import sys

from kis_megatron.sweep import main

if __name__ == "__main__":
    sys.exit(main())
