"""The law fits on simulated ladders with a known truth: the two-stage fit against the joint
fit (bias, interval coverage and width of the exponent, error and coverage of the prediction
for a held-out larger size), and adaptive infusion levels against a fixed grid (runs needed
for the same collapse-point interval width).

    python benchmarks/bench_law_methods.py methods --draws 200       # ~30 min on 2 cores
    python benchmarks/bench_law_methods.py adaptive --draws 100

Scenarios (fixed before the first run; see kis_megatron/law/simulate.py for the model):
the tiny ladder's 4 sizes and levels (32-1024 domain facts, doubling), a held-out size 2x
the largest, true exponent 0.3 or 0.5, binomial probe noise (one probe per fact, at most
256); and a seeds scenario: 2 seeds per level with run-to-run noise of 0.3 on the logit.
Prints Markdown tables for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from kis_megatron.law.analysis import Options, fit_law, locate
from kis_megatron.law.collapse import COLLAPSE, detect_collapse
from kis_megatron.law.refine import interval_width, next_level
from kis_megatron.law.simulate import LadderSpec, draw_truth, rows_to_curve, simulate_rows
from kis_megatron.law.table import LawInputError, select_curves

SCENARIOS = {
    "b=0.3": LadderSpec(b=0.3),
    "b=0.5": LadderSpec(b=0.5),
    "b=0.3, 2 seeds, logit sd 0.3": LadderSpec(b=0.3, seeds=2, seed_sd=0.3),
}
N_BOOT = 400


def one_draw(args):
    """One simulated ladder through the product's own path (analysis.locate and
    analysis.fit_law, with fit_law's defaults but for the bootstrap size)."""
    name, draw, methods = args
    spec = SCENARIOS[name]
    rows, _ = simulate_rows(spec, np.random.default_rng([draw, 7]))
    curves, _ = select_curves(rows, spec.metric)
    points = locate(curves, Options(chance=spec.chance, n_boot=N_BOOT, seed=draw))
    out = {}
    truth_pred = float(spec.true_cp(spec.heldout))
    for m in methods:
        try:
            law = fit_law(curves, points, Options(chance=spec.chance, n_boot=N_BOOT, seed=draw, fit=m))
        except LawInputError:
            out[m] = None
            continue
        lo, hi = law.coef_ci(1)
        pred, plo, phi = (float(v[0]) for v in law.predict(spec.heldout))
        out[m] = dict(b=law.exponent, b_lo=lo, b_hi=hi, pred=pred, p_lo=plo, p_hi=phi,
                      truth_b=spec.b, truth_pred=truth_pred,
                      located=sum(p.status == COLLAPSE for p in points))
    return name, out


def summarize(results: list[dict]) -> dict:
    ok = [r for r in results if r is not None]
    b = np.array([r["b"] for r in ok])
    tb = ok[0]["truth_b"]
    cover_b = np.mean([r["b_lo"] <= tb <= r["b_hi"] for r in ok])
    rel = np.array([(r["pred"] - r["truth_pred"]) / r["truth_pred"] for r in ok])
    cover_p = np.mean([r["p_lo"] <= r["truth_pred"] <= r["p_hi"] for r in ok])
    return dict(n=len(ok), failed=len(results) - len(ok), bias=float(b.mean() - tb),
                rmse=float(np.sqrt(np.mean((b - tb) ** 2))), cover_b=float(cover_b),
                width_b=float(np.mean([r["b_hi"] - r["b_lo"] for r in ok])),
                med_abs_rel=float(np.median(np.abs(rel))), cover_p=float(cover_p),
                width_p=float(np.median([np.log10(r["p_hi"] / r["p_lo"]) for r in ok])))


def run_methods(draws: int, workers: int, methods=("two-stage", "joint")) -> str:
    jobs = [(name, d, methods) for name in SCENARIOS for d in range(draws)]
    per = {(name, m): [] for name in SCENARIOS for m in methods}
    with ProcessPoolExecutor(workers) as ex:
        for name, out in ex.map(one_draw, jobs, chunksize=4):
            for m in methods:
                per[(name, m)].append(out[m])
    lines = [
        f"{draws} simulated ladders per scenario, {N_BOOT} bootstrap replicates, 95% intervals.",
        "",
        "| scenario | fit | bias of b | RMSE of b | b CI covers | mean b CI width | "
        "held-out: median abs. rel. error | held-out interval covers | median interval width (decades) | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in SCENARIOS:
        for m in methods:
            s = summarize(per[(name, m)])
            lines.append(
                f"| {name} | {m} | {s['bias']:+.3f} | {s['rmse']:.3f} | {100 * s['cover_b']:.0f}% | "
                f"{s['width_b']:.3f} | {100 * s['med_abs_rel']:.1f}% | {100 * s['cover_p']:.0f}% | "
                f"{s['width_p']:.3f} | {s['failed']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- adaptive levels

COARSE = (32, 128, 512, 2048)  # four levels, x4 apart: the adaptive start
FIXED_SAME_RANGE = (32, 64, 128, 256, 512, 1024, 2048)  # doubling over the adaptive's range


def _width(curve, rng) -> float:
    p = detect_collapse(curve, chance=0.2, ceiling=1.0, n_boot=N_BOOT, rng=rng)
    w = interval_width(p)
    return np.inf if w is None else w


def adaptive_draw(args):
    draw, target, max_per_curve = args
    spec = SCENARIOS["b=0.3"]
    rng = np.random.default_rng([draw, 11])
    truth = draw_truth(spec, rng)
    out = {"fixed6": [], "fixed7": [], "adaptive": [], "runs": []}
    for i, t in enumerate(truth):
        out["fixed6"].append(_width(rows_to_curve(t.measure(spec.levels, rng)), np.random.default_rng([draw, i, 1])))
        out["fixed7"].append(_width(rows_to_curve(t.measure(FIXED_SAME_RANGE, rng)), np.random.default_rng([draw, i, 3])))
        rows = t.measure(COARSE, rng)
        while True:
            curve = rows_to_curve(rows)
            point = detect_collapse(curve, chance=spec.chance, ceiling=1.0, n_boot=N_BOOT,
                                    rng=np.random.default_rng([draw, i, 2]))
            level = next_level(curve, point, target_width=target, integer=True, limits=(1, 4096))
            if level is None or len(rows) >= len(COARSE) + max_per_curve:
                break
            rows += t.measure([level], rng)
        w = interval_width(point)
        out["adaptive"].append(np.inf if w is None else w)
        out["runs"].append(len(rows))
    return out


def run_adaptive(draws: int, workers: int, max_per_curve: int) -> str:
    # The target is the same-range fixed grid's median width, measured on its own draws first.
    with ProcessPoolExecutor(workers) as ex:
        probe = list(ex.map(adaptive_draw, [(d, 1e9, 0) for d in range(draws)]))
    f6 = np.array([w for r in probe for w in r["fixed6"]])
    f7 = np.array([w for r in probe for w in r["fixed7"]])
    target = float(np.median(f7))
    with ProcessPoolExecutor(workers) as ex:
        res = list(ex.map(adaptive_draw, [(d, target, max_per_curve) for d in range(draws)]))
    aw = np.array([w for r in res for w in r["adaptive"]])
    runs = np.array([n for r in res for n in r["runs"]])

    def row(name, n, w):
        return (f"| {name} | {n} | {np.median(w):.3f} | {100 * np.mean(w <= target):.0f}% | "
                f"{int(np.sum(~np.isfinite(w)))} |")

    return "\n".join([
        f"{draws} simulated ladders (b = 0.3, 4 sizes, {4 * draws} curves), {N_BOOT} bootstrap replicates.",
        f"Target: the median collapse-interval width of the fixed grid over the same range, {target:.3f} decades.",
        "",
        "| levels | runs per curve (mean) | median width (decades) | curves at or under target | curves not located |",
        "|---|---|---|---|---|",
        row(f"fixed, doubling over 32-2048 {list(FIXED_SAME_RANGE)}", 7, f7),
        row(f"fixed, doubling over 32-1024 {list(SCENARIOS['b=0.3'].levels)} (narrower range)", 6, f6),
        row(f"adaptive from {list(COARSE)}, at most {max_per_curve} added", f"{runs.mean():.2f}", aw),
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["methods", "adaptive"])
    ap.add_argument("--draws", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-added", type=int, default=4, help="adaptive: runs added per curve at most")
    ap.add_argument("--methods", default="two-stage,joint", help="methods: comma-separated fits")
    args = ap.parse_args(argv)
    t0 = time.time()
    table = run_methods(args.draws, args.workers, tuple(args.methods.split(","))) if args.what == "methods" else \
        run_adaptive(args.draws, args.workers, args.max_added)
    print(f"<!-- {datetime.date.today()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, numpy {np.__version__}; "
          f"`python benchmarks/bench_law_methods.py {' '.join(sys.argv[1:])}`, {time.time() - t0:.0f} s -->")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
