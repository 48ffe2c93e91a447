"""Run a grid of training runs (model sizes x infusion amounts x budgets) from one sweep file.

    python tools/sweep.py examples/tiny_ladder/sweep.yaml --jobs 2
    python tools/sweep.py SWEEP.yaml --list
    python tools/sweep.py SWEEP.yaml --print-launch slurm > runs.txt
    python tools/sweep.py SWEEP.yaml --refine --jobs 2                     # add levels where collapses are unsure
    python tools/sweep.py SWEEP.yaml --refine --print-launch slurm         # one refinement round, then print
    python tools/sweep.py SWEEP.yaml --validate LAW_JSON --print-launch slurm   # larger model at the prediction

The sweep file format (value axes, refine:, validate:) and the behaviour (skip finished runs,
resume interrupted ones, largest model first, refine.json, validation_plan.json) are
documented in kis_megatron/sweep/__init__.py.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Optional

from kis_megatron.config import ConfigError
from kis_megatron.errors import KisError, exit_with
from kis_megatron.sweep import load_sweep, print_launch, run_local, run_status
from kis_megatron.sweep.refine import plan_refinement, refine_local
from kis_megatron.sweep.validate import validation_sweep


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="sweep YAML file")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each should use 1/jobs of the cores)")
    ap.add_argument("--print-launch", choices=["torchrun", "slurm"],
                    help="print the cluster commands for the unfinished runs instead of running them")
    ap.add_argument("--list", action="store_true", help="list the runs and their status (plans nothing)")
    ap.add_argument("--refine", action="store_true",
                    help="add infusion levels where each curve's collapse is least known (refine: section); "
                    "with --print-launch: plan one round from the finished runs, then print")
    ap.add_argument("--validate", metavar="LAW_JSON",
                    help="work on the validation runs (validate: section) centred on the collapse point "
                    "that LAW_JSON (written by tools/fit_law.py) predicts for the larger model")
    ap.add_argument("--force-new-plan", action="store_true",
                    help="with --validate: replace a validation plan made from another law.json "
                    "(finished runs are kept)")
    args = ap.parse_args(argv)
    try:
        if args.force_new_plan and not args.validate:
            raise ConfigError("--force-new-plan goes with --validate LAW_JSON")
        if args.jobs < 1:
            raise ConfigError("--jobs must be >= 1")
        sweep = load_sweep(args.sweep)
        if args.refine and sweep.refine is None:
            raise ConfigError(f"{args.sweep}: --refine needs a refine: section in the sweep file")
        if args.validate:
            sweep = validation_sweep(sweep, args.validate, force_new_plan=args.force_new_plan,
                                     write=not args.list, log=_stderr)
        if args.list or args.print_launch:  # let `| head` end the listing quietly
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        if args.list:
            for r in sweep.runs:
                origin = "" if r.origin == "grid" else f"  ({r.origin})"
                print(f"{r.run_id:30s} {r.params:>12,d} params  {run_status(r)}{origin}")
            return 0
        if args.print_launch:
            if args.refine:
                plan_refinement(sweep, log=_stderr)
            sys.stdout.write(print_launch(sweep, args.print_launch))
            return 0
        if args.refine:
            outcome = refine_local(sweep, jobs=args.jobs)
        else:
            outcome = run_local(sweep, jobs=args.jobs)
    except (KisError, OSError) as e:  # OSError: the file system refused (path, cause)
        return exit_with(e)
    failed = [k for k, v in outcome.items() if v.startswith("FAILED")]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
