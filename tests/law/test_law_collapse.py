import math

import numpy as np
import pytest

from kis_megatron.law.collapse import (
    AT_START,
    COLLAPSE,
    FLOOR_UNOBSERVED,
    NO_COLLAPSE,
    PLATEAU_UNOBSERVED,
    detect_collapse,
    step_curve,
)
from kis_megatron.law.refine import next_level
from kis_megatron.law.table import Curve

LEVELS = np.geomspace(10.0, 10_000.0, 10)


def curve(x, y, n=1e6, d=1e9):
    return Curve(n, d, np.asarray(x, dtype=float), np.asarray(y, dtype=float))


@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_noise_free_step_gives_the_exact_crossing(fraction):
    # Ground truth: floor 0.2 + 0.7 * sigmoid(-(x - log10 300) / 0.2); the fraction-f point
    # of that curve is log10(300) + 0.2 * ln((1 - f) / f), whatever the fit's parametrisation.
    y = step_curve(np.log10(LEVELS), 0.9, 0.2, math.log10(300.0), 0.2)
    cp = detect_collapse(curve(LEVELS, y), fraction=fraction, chance=0.2, n_boot=20)
    truth = math.log10(300.0) + 0.2 * math.log((1 - fraction) / fraction)
    assert cp.status == COLLAPSE
    assert math.log10(cp.collapse_infusion) == pytest.approx(truth, abs=1e-4)
    assert cp.ci[0] <= cp.collapse_infusion <= cp.ci[1]


def test_crossing_matches_brute_force_search_on_the_fitted_curve(true_retention):
    rng = np.random.default_rng(3)
    y = true_retention(LEVELS, 500.0, width=0.15) + rng.normal(0, 0.02, LEVELS.size)
    cp = detect_collapse(curve(LEVELS, y), fraction=0.4, chance=0.2, n_boot=20)
    # Independent reference: bisection for fit(x) = floor + 0.4 * (plateau - floor).
    target = cp.fit.floor + 0.4 * (cp.fit.plateau - cp.fit.floor)
    lo, hi = LEVELS[0], LEVELS[-1]
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cp.fit(mid) > target else (lo, mid)
    assert cp.collapse_infusion == pytest.approx(lo, rel=1e-9)
    assert cp.threshold == pytest.approx(target, rel=1e-12)


def test_free_floor_is_fitted_when_no_chance_is_given(true_retention):
    y = true_retention(LEVELS, 200.0, width=0.1, chance=0.35, plateau=0.95)
    cp = detect_collapse(curve(LEVELS, y), n_boot=20)
    assert cp.fit.floor == pytest.approx(0.35, abs=2e-3)
    assert cp.collapse_infusion == pytest.approx(200.0, rel=0.01)


def test_initial_rise_is_ignored(true_retention):
    # Too little infused at first (retention rises from chance), then plateau, then collapse.
    x = np.geomspace(1.0, 10_000.0, 13)
    y = true_retention(x, 1000.0, width=0.12, rise_at=5.0)
    cp = detect_collapse(curve(x, y), chance=0.2, n_boot=20)
    assert cp.status == COLLAPSE
    assert cp.collapse_infusion == pytest.approx(1000.0, rel=0.02)
    assert cp.fit_range[0] > 5.0  # the fit starts on the plateau, after the rise


def test_noisy_collapse_point_with_seeds(true_retention):
    rng = np.random.default_rng(7)
    x = np.repeat(LEVELS, 2)  # two seeds per level
    y = rng.binomial(400, true_retention(x, 700.0)) / 400
    cp = detect_collapse(curve(x, y), chance=0.2, n_boot=100, rng=np.random.default_rng(0))
    assert cp.status == COLLAPSE and cp.n_measurements == 20 and cp.n_levels == 10
    assert cp.collapse_infusion == pytest.approx(700.0, rel=0.08)
    assert cp.ci[0] < cp.collapse_infusion < cp.ci[1]
    assert cp.ci[1] / cp.ci[0] < 1.5  # an interval, not everything
    again = detect_collapse(curve(x, y), chance=0.2, n_boot=100, rng=np.random.default_rng(0))
    assert again.ci == cp.ci  # fixed seed, same interval


def test_bootstrap_intervals_cover_the_truth_in_repeated_experiments(true_retention):
    # 20 independent noisy curves (one seed per level, 9 levels): the 95% intervals should
    # cover the true point about 95% of the time (simulations with 100 curves: 94%); an
    # interval blind to the noise would cover far less often.
    x = np.geomspace(0.05, 2.0, 9)
    covered, errors = 0, []
    for s in range(20):
        rng = np.random.default_rng(100 + s)
        y = true_retention(x, 0.3, width=0.15) + rng.normal(0, 0.02, x.size)
        cp = detect_collapse(curve(x, y), chance=0.2, n_boot=40, rng=rng)
        covered += cp.ci[0] <= 0.3 <= cp.ci[1]
        errors.append(math.log10(cp.collapse_infusion / 0.3))
    assert covered >= 16
    assert abs(np.mean(errors)) < 0.01  # no bias beyond 2% in the point


def test_monotone_falling_curve_of_the_pilot():
    # PILOT.md grid A, 458k params: domain retention vs number of domain facts.
    x = [64, 128, 256, 512, 1024, 2048]
    y = [1.00, 1.00, 0.82, 0.44, 0.25, 0.22]
    cp = detect_collapse(curve(x, y), chance=0.2, n_boot=50)
    assert cp.status == COLLAPSE
    # Half of the way from 1.0 to chance (0.6) is crossed between 256 (.82) and 512 (.44).
    assert 256 < cp.collapse_infusion < 512
    assert cp.fit_range == (64.0, 2048.0)


def test_no_fall_gives_a_lower_bound_and_no_point():
    rng = np.random.default_rng(1)
    y = 0.85 + rng.normal(0, 0.02, LEVELS.size)
    cp = detect_collapse(curve(LEVELS, y), chance=0.2, n_boot=20)
    assert cp.status == NO_COLLAPSE
    assert cp.lower_bound == LEVELS[-1]
    assert cp.collapse_infusion is None and cp.ci is None and cp.boot_log10 is None


def test_fall_that_stays_above_the_threshold_gives_a_lower_bound(true_retention):
    # The fall begins at the edge of the range: 0.9 -> ~0.7, never below 0.55.
    y = true_retention(LEVELS, 30_000.0, width=0.3)
    assert y.min() > 0.55
    cp = detect_collapse(curve(LEVELS, y), chance=0.2, n_boot=20)
    assert cp.status == NO_COLLAPSE and cp.lower_bound == LEVELS[-1]


def test_fall_at_the_last_level_without_known_floor_gives_a_lower_bound():
    x = [1, 2, 4, 8, 16, 32]
    y = [0.90, 0.91, 0.89, 0.90, 0.88, 0.55]
    cp = detect_collapse(curve(x, y), n_boot=20)  # floor unknown: where is "half"?
    assert cp.status == FLOOR_UNOBSERVED and cp.lower_bound == 16 and cp.collapse_infusion is None
    known = detect_collapse(curve(x, y), chance=0.2, n_boot=20)  # now 0.55 is below half
    assert known.status == COLLAPSE and 16 < known.collapse_infusion < 32


def test_fall_sharper_than_the_grid_gets_the_bracketing_levels_as_ci():
    # A cliff between 100 and 1000 and nothing measured on it: the data cannot tell where
    # in that decade the collapse is, and the interval must say so.
    x = np.repeat([1.0, 10.0, 100.0, 1000.0, 10_000.0], 2)
    y = np.array([0.90, 0.92, 0.91, 0.89, 0.90, 0.91, 0.21, 0.19, 0.20, 0.22])
    cp = detect_collapse(curve(x, y), chance=0.2, n_boot=50)
    assert cp.status == COLLAPSE and 100 < cp.collapse_infusion < 1000
    assert cp.ci[0] <= 100.0 * (1 + 1e-9) and cp.ci[1] >= 1000.0 * (1 - 1e-9)


def test_curve_at_chance_throughout_gives_an_upper_bound():
    rng = np.random.default_rng(2)
    y = 0.2 + rng.normal(0, 0.02, LEVELS.size)
    cp = detect_collapse(curve(LEVELS, y), chance=0.2, n_boot=20)
    assert cp.status == AT_START
    assert cp.upper_bound == LEVELS[0] and cp.collapse_infusion is None


def test_bad_settings_are_rejected(true_retention):
    y = true_retention(LEVELS, 300.0)
    with pytest.raises(ValueError, match="fraction"):
        detect_collapse(curve(LEVELS, y), fraction=1.0)
    with pytest.raises(ValueError, match="min_drop"):
        detect_collapse(curve(LEVELS, y), min_drop=0)


def test_a_curve_falling_from_its_first_level_has_no_measured_plateau():
    # The validation model's first level already lies on the fall: the threshold (a share of
    # the plateau) is unknown, so the crossing is only an upper bound, and refining extends down.
    x = np.array([441.0, 699, 1108, 1755])
    curve = Curve(1e6, 1e9, x, np.array([0.76, 0.52, 0.27, 0.20]))
    p = detect_collapse(curve, chance=0.2, ceiling=1.0, n_boot=50)
    assert p.status == PLATEAU_UNOBSERVED and p.collapse_infusion is None
    assert 441 < p.upper_bound < 1108 and "add levels below" in p.note
    assert next_level(curve, p, integer=True) == 220
    # at the ceiling, or with two flat levels at the start, the plateau is measured
    at_top = Curve(1e6, 1e9, x, np.array([1.0, 0.52, 0.27, 0.20]))
    assert detect_collapse(at_top, chance=0.2, ceiling=1.0, n_boot=50).status == COLLAPSE
    flat = Curve(1e6, 1e9, np.array([220.0, 441, 699, 1108, 1755]), np.array([0.78, 0.76, 0.52, 0.27, 0.20]))
    assert detect_collapse(flat, chance=0.2, ceiling=1.0, n_boot=50).status == COLLAPSE
    # without a ceiling, a curve at 1.0 that falls at once is not known to have plateaued
    assert detect_collapse(at_top, chance=0.2, n_boot=50).status == PLATEAU_UNOBSERVED
