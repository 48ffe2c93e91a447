"""Sweeps: a grid of training runs (model sizes x infusion amounts x token budgets ...)
over one base config, run locally or printed as cluster launch commands; optionally refined
where each retention curve's collapse is least known, and validated on a larger model.

A sweep file::

    base: examples/tiny_ladder/base.yaml     # a kis-train config (relative to this file)
    out: out/tiny_ladder/runs                # one run directory per grid point
    overrides: {train.threads: 1}            # applied to every run
    axes:                                    # the grid is the product of the axes
      model:                                 # named points
        - {name: d32, overrides: {model.dim: 32}}
        - {name: d64, overrides: {model.dim: 64}}
      infusion:                              # a value axis: values and a template
        values: [32, 128, 512, 2048]
        name: "f{value:04d}"                 # str.format with `value`; default "<axis>{value}"
        overrides: {infusion.facts: "{value}"}    # with infusion.kind: domain_facts in base
        integer: true                        # generated levels are rounded to integers
      seed: {values: [0, 1], name: "s{value}", overrides: {train.seed: "{value}"}}

Run ids join the point names (``d32-f0128-s0``); each run's ``log.dir`` is ``out/<run id>``,
so a name must not hold a path separator or start with a dot. On a value axis an override
that is exactly ``"{value}"`` becomes the number itself (an int when ``integer``), other
strings are formatted (double a literal brace). Runs already finished (``run.json`` says so)
are skipped; every other run is (re)started with ``checkpoint.resume=auto``: an interrupted
one continues from its latest whole checkpoint, or starts afresh when it has none; a failed
one (e.g. diverged) is tried again, and its reason is reported if it fails again. Local runs
go largest model first (by parameter count), ``jobs`` at a time, each in its own process so a
failure stays contained.

Refinement (``tools/sweep.py FILE --refine``; sweep/refine.py)::

    refine:
      axis: infusion            # a value axis; its values must be what run.json logs as the
                                #   infusion value (the knob of infusion.kind)
      metric: retention/domain
      chance: auto              # as fit_law --chance: a number, auto, or omitted (fitted floor)
      target_width: 0.15        # decades: a curve is done when its collapse CI is this narrow
      max_runs: 8               # extra runs in all (0 disables)
      limits: [1, 2048]         # optional bounds on the axis value
      seed_axis: seed           # optional: a new level is run for every seed

A curve is the set of runs that share every axis point but the refined axis and the seed
axis. Once all of a curve's runs are finished, its collapse is located (law/collapse.py) and
``law.refine.next_level`` proposes one more level, run as a new point of the value axis.
Rounds repeat until no curve proposes or ``max_runs`` is spent. The added levels are recorded
in ``<out>/refine.json``; loading the sweep re-adds them, so refinement resumes like any sweep.
With ``--print-launch``, ``--refine`` plans one round from the runs finished so far and prints
the commands of every unfinished run: alternate launching and ``--refine --print-launch``
until it prints no run.

Validation (``tools/sweep.py FILE --validate LAW_JSON``; sweep/validate.py)::

    validate:
      model: {name: d192, overrides: {model.dim: 192}}   # the larger held-out model
      model_axis: model          # the axis that point replaces (default model)
      axis: infusion             # the levels' axis (default: refine's axis)
      levels: 5                  # runs centred on the predicted collapse point
      spacing: 0.2               # decades between levels
      refine_runs: 2             # extra runs --refine may add to this curve (default: refine's max_runs)
      out: out/validate_runs     # default: <out>_validate

It predicts the validation model's collapse point from the fitted law (N counted on the meta
device, D = global_batch * seq_len * steps of its config), runs CP * 10^(spacing * k) for
k = -(levels-1)/2 ... (levels-1)/2 crossed with the other axes (seeds repeat), records the
plan in ``<validate out>/validation_plan.json``, and with ``--refine`` refines that curve too.

The package, by role: spec.py (the file's sections, parsed), grid.py (runs and their
resolved configs), status.py (what a run directory says), launch.py (local pool and cluster
text), refine.py (added levels), validate.py (the held-out model's runs).  Nothing here
imports torch at import time: a run's parameters are counted when it is built.
"""

from kis_megatron.sweep.grid import PLAN_FILE, REFINE_FILE, Sweep, SweepRun, build_run, load_sweep
from kis_megatron.sweep.launch import print_launch, run_local, train_args, train_command
from kis_megatron.sweep.status import run_info, run_status

__all__ = ["PLAN_FILE", "REFINE_FILE", "Sweep", "SweepRun", "build_run", "load_sweep", "print_launch",
           "run_info", "run_local", "run_status", "train_args", "train_command"]
