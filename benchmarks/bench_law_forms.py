"""The form selection on simulated ladders with a known truth: how often the rule of
kis_megatron/law/select.py picks the true form, and how often the 95% prediction interval
(spanning the credible forms) covers the true collapse point of a held-out size 2x the
largest, in each regime.

    python benchmarks/bench_law_forms.py --draws 50                   # the tables in RESULTS.md
    python benchmarks/bench_law_forms.py --draws 50 --curve-sd 0
    python benchmarks/bench_law_forms.py --draws 30 --first 0         # development draws

Regimes (kis_megatron/law/simulate.py, FORM_REGIMES; the tiny ladder's 4 sizes, R = 12,100
renderings per run, E* = 85 at the smallest size):
- power: E* = 85 (N / N_1)^-0.6, no floor (the paper's law); the true form is power.
- floor inside: E_inf = 20, alpha = 1.5: E* at the largest size is 1.12 E_inf; the true form
  is floor.  The ladder can tell both of these.
- floor beyond: E_inf = 8, alpha = 0.9: E* at the largest size is 2.4 E_inf, still falling;
  the ladder cannot tell it from a power law, and only coverage is asked of it.
Levels: doubling from 32 to 2048 facts; binomial noise over min(facts, 256) probes,
run-to-run noise of 0.1 on the logit (the tiny ladder's curves show less than 0.1 beyond
their probes), and a seed's shift of each whole curve's collapse point, 0.07 decades by
default (sd; the tiny ladder's d192 collapsed at 511 and about 650 facts for two seeds, 0.10
decades apart); --curve-sd 0 leaves it out.  The rule was developed on draws 0-29 (--first 0);
the recorded tables are draws 1000-1049.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from kis_megatron.law.simulate import FORM_REGIMES, form_selection_draw, summarize_selection

CURVE_SD = 0.07
N_BOOT = 200


def one_draw(args) -> dict:
    return form_selection_draw(*args, n_boot=N_BOOT)


def table(results: list[dict], draws: int, curve_sd: float) -> str:
    lines = [
        f"{draws} simulated ladders per regime (draws from {results[0]['draw']}), a seed's shift of "
        f"each curve {curve_sd:g} decades, {N_BOOT} bootstrap replicates, 95% intervals; held-out "
        "size 2x the largest.",
        "",
        "| regime | true form | ladder can tell | picks the true form | power / floor / broken picked | "
        "interval covers the truth | median abs. error of the prediction | median interval half-width | failed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, (true_form, _, can_tell) in FORM_REGIMES.items():
        s = summarize_selection(results, regime)
        counts = " / ".join(str(s["picked"][f]) for f in ("power", "floor", "broken"))
        lines.append(f"| {regime} | {true_form} | {'yes' if can_tell else 'no'} | {100 * s['right']:.0f}% | "
                     f"{counts} | {100 * s['cover']:.0f}% | {100 * s['error']:.1f}% | "
                     f"+-{100 * s['half_width']:.0f}% | {s['failed']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=100)
    ap.add_argument("--first", type=int, default=1000, help="first draw (1000: the recorded tables)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--curve-sd", type=float, default=CURVE_SD,
                    help="a seed's shift of a whole curve's collapse point, decades (default %(default)s)")
    ap.add_argument("--raw", help="also write every draw's result to this JSON Lines file")
    args = ap.parse_args(argv)
    t0 = time.time()
    jobs = [(r, d, args.curve_sd) for r in FORM_REGIMES for d in range(args.first, args.first + args.draws)]
    results = []
    with ProcessPoolExecutor(args.workers) as ex, open(args.raw or os.devnull, "w") as raw:
        for r in ex.map(one_draw, jobs, chunksize=2):
            results.append(r)
            raw.write(json.dumps(r) + "\n")
            raw.flush()
    print(f"<!-- {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, numpy {np.__version__}; "
          f"`python benchmarks/bench_law_forms.py {' '.join(sys.argv[1:])}`, {time.time() - t0:.0f} s -->")
    print(table(results, args.draws, args.curve_sd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
