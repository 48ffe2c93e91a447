"""Fit the knowledge infusion scaling law from runs or a measurement table.

    python tools/fit_law.py --runs runs/ladder --out out/law --chance 0.2 --predict 1e9
    python tools/fit_law.py --table table.csv --out out/law --metric retention/general

Per (model size, token budget) it locates the critical collapse point of the retention
metric against infusion (smooth step fit in log-infusion, bootstrap CI; see
kis_megatron/law/collapse.py), fits CP = a * N^b (* D^c when several budgets exist) in
log space with bootstrap CIs, checks the law by leaving the largest model out, and
predicts the collapse infusion of a target model with --predict N[,D].  Writes
OUT/law.json, OUT/report.md, OUT/retention_curves.png, OUT/law.png (and OUT/table.csv
with --runs), all at once: on an error nothing is written and the exit code is 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from kis_megatron.errors import KisError
from kis_megatron.law.analysis import Options, analyze
from kis_megatron.law.report import check_out_dir, write_outputs
from kis_megatron.law.runs import extract_runs, find_run_dirs
from kis_megatron.law.table import read_table


def _chance(text: str):
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'auto', not {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", metavar="RUN_DIR",
                     help="run directories (final evaluation of each finished run)")
    src.add_argument("--table", metavar="FILE", help="measurement table, .csv or .parquet")
    ap.add_argument("--out", required=True, metavar="DIR", help="output directory")
    ap.add_argument("--predict", metavar="N[,D]", help="target model size (and token budget)")
    ap.add_argument("--metric", default="retention/domain",
                    help="metric whose fall defines the collapse, an accuracy such as the "
                    "default %(default)s (retention/general for forgetting)")
    ap.add_argument("--infusion-kind", help="which knob, when the table mixes several")
    ap.add_argument("--chance", type=_chance,
                    help="known floor of the metric, e.g. 0.2 for 4 distractors, or 'auto' for "
                    "the retention_chance/<name> the evaluator logged (default: fitted)")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="collapse where retention above the floor falls to this share of its "
                    "plateau (default %(default)s)")
    ap.add_argument("--min-drop", type=float, default=0.1,
                    help="smallest fall of the metric that counts as a collapse (default %(default)s)")
    ap.add_argument("--bootstrap", type=int, default=1000, help="replicates (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="bootstrap seed (default %(default)s)")
    ap.add_argument("--confidence", type=float, default=0.95, help="interval level (default %(default)s)")
    args = ap.parse_args(argv)
    options = Options(
        metric=args.metric, infusion_kind=args.infusion_kind, fraction=args.fraction,
        chance=args.chance, min_drop=args.min_drop, n_boot=args.bootstrap, seed=args.seed,
        confidence=args.confidence,
    )
    try:
        check_out_dir(args.out)  # fail before the slow part
        if args.runs:
            run_dirs = find_run_dirs(args.runs)
            rows, notes = extract_runs(run_dirs)
            for note in notes:
                print(f"warning: {note}", file=sys.stderr)
            sources = run_dirs
        else:
            rows, sources = read_table(args.table), [args.table]
        result = analyze(rows, options, args.predict)
        result.sources = [os.path.abspath(s) for s in sources]
        write_outputs(result, args.out, rows if args.runs else None)
    except KisError as e:  # LawInputError, and a run directory's own errors
        print(f"error: {e}", file=sys.stderr)
        return 2
    law = result.law
    lo, hi = law.coef_ci(1)
    print(f"{law.form()}: a = {law.coefficient:.4g}, b = {law.exponent:.4g} "
          f"[{lo:.4g}, {hi:.4g}] from {len(law.points)} collapse points")
    if result.prediction:
        p = result.prediction
        d = f", D={p['tokens']:.4g}" if p["tokens"] else ""
        print(f"prediction for N={p['model_params']:.4g}{d}: {p['collapse_infusion']:.4g} "
              f"[{p['interval'][0]:.4g}, {p['interval'][1]:.4g}]")
    print(f"wrote {args.out}/law.json, report.md, plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
