"""Read run directories into the tidy measurement table that tools/fit_law.py fits.

    python tools/extract_metrics.py runs/ladder/* --out table.csv
    python tools/extract_metrics.py 'runs/**/n*' --glob --all-evals --out table.csv

By default each finished run gives its final evaluation; --all-evals gives every
evaluation of every run (unfinished runs included).  One row per metric: columns
model_params, tokens, infusion, metric, value, run_id, step, exposures, infusion_kind,
seed, n_probes, domain_tokens (kis_megatron/law/table.py says what each means).  Metrics come from metrics.jsonl, or from the TensorBoard events in tb/ when
metrics.jsonl is missing.  Writes CSV, or Parquet when the name ends in .parquet and
pyarrow is installed; the file is written atomically.
"""

from __future__ import annotations

import argparse
import os
import sys

from kis_megatron.law.runs import extract_runs, find_run_dirs
from kis_megatron.errors import KisError, exit_with
from kis_megatron.law.table import LawInputError, read_table, write_table
from kis_megatron.utils import refuse_to_replace


def _earlier_table(path: str) -> bool:
    """Whether ``path`` is a measurement table (one this tool wrote may be rebuilt)."""
    try:
        read_table(path)
    except (LawInputError, OSError, ValueError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR",
                    help="run directories, or directories holding run directories")
    ap.add_argument("--glob", action="store_true",
                    help="treat each RUN_DIR as a glob pattern ('**' allowed)")
    ap.add_argument("--out", required=True, help="output table, .csv or .parquet")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--final-only", action="store_true",
                      help="final evaluation of each finished run (default)")
    mode.add_argument("--all-evals", action="store_true", help="every evaluation of every run")
    ap.add_argument("--force", action="store_true", help="replace an --out that is not a measurement table")
    args = ap.parse_args(argv)
    try:
        if os.path.lexists(args.out) and not _earlier_table(args.out):
            refuse_to_replace([args.out], args.force)
        rows, notes = extract_runs(find_run_dirs(args.runs, args.glob), args.all_evals)
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        write_table(rows, args.out)
    except (KisError, OSError) as e:  # OSError: the file system refused (path, cause)
        return exit_with(e)
    runs = len({r["run_id"] for r in rows})
    print(f"wrote {len(rows)} rows from {runs} runs to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
