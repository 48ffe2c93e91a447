"""The law tools on simulated ladders with a known truth (kis_megatron/law/simulate.py): the
default fit's intervals cover the truth, and adaptive levels beat a fixed grid.  The full
comparison, with more draws, is benchmarks/bench_law_methods.py (results in
benchmarks/RESULTS.md)."""

from __future__ import annotations

import numpy as np
import pytest

from kis_megatron.law.analysis import Options, fit_law, locate
from kis_megatron.law.collapse import COLLAPSE, detect_collapse
from kis_megatron.law.refine import interval_width, next_level
from kis_megatron.law.simulate import LadderSpec, draw_truth, rows_to_curve, simulate_rows
from kis_megatron.law.table import LawInputError, select_curves

pytestmark = pytest.mark.slow

DRAWS = 100


def test_default_fit_intervals_cover_the_true_exponent_and_held_out_collapse():
    # The tiny ladder's design (4 sizes, levels 32-1024 facts, binomial probe noise), a true
    # exponent of 0.3, a held-out size 2x the largest; 95% intervals should cover >= 90%.
    spec = LadderSpec(b=0.3)
    opts = Options(chance=spec.chance, n_boot=200)  # the default fit (joint)
    truth = float(spec.true_cp(spec.heldout))
    cover_b = cover_p = 0
    for draw in range(DRAWS):
        rows, _ = simulate_rows(spec, np.random.default_rng([draw, 7]))
        curves, _ = select_curves(rows, spec.metric)
        points = locate(curves, Options(chance=spec.chance, n_boot=20, seed=draw))
        try:
            law = fit_law(curves, points, Options(chance=spec.chance, n_boot=200, seed=draw))
        except LawInputError:  # too few located curves: counts as a miss
            continue
        assert law.method == opts.fit == "joint"
        lo, hi = law.coef_ci(1)
        cover_b += lo <= spec.b <= hi
        _, plo, phi = (float(v[0]) for v in law.predict(spec.heldout))
        cover_p += plo <= truth <= phi
    assert cover_b / DRAWS >= 0.90, f"exponent interval covered {cover_b}/{DRAWS}"
    assert cover_p / DRAWS >= 0.90, f"held-out prediction interval covered {cover_p}/{DRAWS}"


def test_adaptive_levels_reach_the_fixed_grid_width_with_fewer_runs():
    # Both know the same range, 32-2048 facts: a fixed grid doubling over it (7 runs per
    # curve) against 4 levels x4 apart refined by next_level until the fixed grid's median
    # width is reached (at most 4 runs more).  benchmarks/bench_law_methods.py adaptive has
    # the same comparison with more draws.
    spec = LadderSpec(b=0.3)
    fixed_levels, coarse = (32, 64, 128, 256, 512, 1024, 2048), (32, 128, 512, 2048)
    fixed_w, curves = [], []
    for draw in range(10):
        rng = np.random.default_rng([draw, 11])
        for i, t in enumerate(draw_truth(spec, rng)):
            p = detect_collapse(rows_to_curve(t.measure(fixed_levels, rng)), chance=spec.chance,
                                ceiling=1.0, n_boot=200, rng=np.random.default_rng([draw, i]))
            fixed_w.append(interval_width(p) if p.status == COLLAPSE else np.inf)
            curves.append((t, rng))
    target = float(np.median(fixed_w))
    adapt_w, runs = [], []
    for j, (t, rng) in enumerate(curves):
        rows = t.measure(coarse, rng)
        while True:
            curve = rows_to_curve(rows)
            p = detect_collapse(curve, chance=spec.chance, ceiling=1.0, n_boot=200,
                                rng=np.random.default_rng([j, 2]))
            level = next_level(curve, p, target_width=target, integer=True, limits=(1, 4096))
            if level is None or len(rows) >= len(coarse) + 4:
                break
            rows += t.measure([level], rng)
        adapt_w.append(interval_width(p) if p.status == COLLAPSE else np.inf)
        runs.append(len(rows))
    assert np.mean(runs) < len(fixed_levels), f"adaptive used {np.mean(runs):.2f} runs per curve"
    assert np.median(adapt_w) <= target, f"adaptive median width {np.median(adapt_w):.3f} > {target:.3f}"
