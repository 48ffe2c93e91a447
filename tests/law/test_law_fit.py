import math

import numpy as np
import pytest

from kis_megatron.law.analysis import Options, analyze, parse_target
from kis_megatron.law.collapse import COLLAPSE, NO_COLLAPSE, CollapsePoint
from kis_megatron.law.fit import fit_points, leave_largest_out
from kis_megatron.law.table import LawInputError


def point(n, d, cp, boot_sd=0.01, status=COLLAPSE, seed=0, n_boot=400):
    """A located collapse point with synthetic bootstrap replicates around log10 cp."""
    rng = np.random.default_rng([seed, int(n), int(d)])
    boot = math.log10(cp) + rng.normal(0, boot_sd, n_boot)
    lo, hi = 10 ** np.quantile(boot, [0.025, 0.975])
    if status != COLLAPSE:
        return CollapsePoint(n, d, status, "bound", lower_bound=cp)
    return CollapsePoint(n, d, status, "", collapse_infusion=cp, ci=(lo, hi), boot_log10=boot)


def test_exact_power_law_is_recovered():
    sizes = [1e6, 4e6, 1.6e7, 6.4e7]
    law = fit_points([point(n, 1e9, 2.5e-3 * n**0.27) for n in sizes])
    assert not law.use_tokens
    assert law.exponent == pytest.approx(0.27, abs=1e-12)
    assert law.coefficient == pytest.approx(2.5e-3, rel=1e-10)
    assert law.rms_log10_residual < 1e-12
    lo, hi = law.coef_ci(1)
    assert lo < 0.27 < hi
    # The interval comes from the replicates: 0.01 decade noise on 4 points over 1.8
    # decades of N gives a slope standard error of about 0.01 / (sd of log10 N * 2) ~ 0.007.
    assert 0.005 < hi - lo < 0.06


def test_exact_law_with_token_budget_is_recovered():
    pts = [point(n, d, 4e-5 * n**0.3 * d**0.15) for n in (1e6, 1e7, 1e8) for d in (1e9, 1e10)]
    law = fit_points(pts)
    assert law.use_tokens and law.form_text() == "CP = a * N^b * D^c"
    assert law.exponent == pytest.approx(0.3, abs=1e-10)
    assert law.tokens_exponent == pytest.approx(0.15, abs=1e-10)
    assert law.coefficient == pytest.approx(4e-5, rel=1e-8)
    pred, lo, hi = law.predict(1e9, 1e11)
    assert pred[0] == pytest.approx(4e-5 * 1e9**0.3 * 1e11**0.15, rel=1e-9)
    assert lo[0] < pred[0] < hi[0]
    with pytest.raises(LawInputError, match="N,D"):
        law.predict(1e9)


def test_slope_matches_an_independent_float64_regression():
    rng = np.random.default_rng(5)
    n = np.array([2e5, 1e6, 3e6, 2e7, 9e7])
    cp = 0.01 * n**0.2 * 10 ** rng.normal(0, 0.05, n.size)  # off the law, so residuals exist
    law = fit_points([point(a, 1e9, c) for a, c in zip(n, cp)])
    x, y = np.log10(n), np.log10(cp)
    slope = np.sum((x - x.mean()) * (y - y.mean())) / np.sum((x - x.mean()) ** 2)
    assert law.exponent == pytest.approx(slope, rel=1e-12)
    resid = y - (y.mean() + slope * (x - x.mean()))
    assert law.rms_log10_residual == pytest.approx(np.sqrt(np.mean(resid**2)), rel=1e-10)


def test_bounds_are_excluded_and_one_size_is_an_error():
    pts = [point(1e6, 1e9, 0.2), point(1e7, 1e9, 0.3), point(1e8, 1e9, 3.0, status=NO_COLLAPSE)]
    law = fit_points(pts)
    assert [p.model_params for p in law.points] == [1e6, 1e7]
    with pytest.raises(LawInputError, match="no law can be fitted.*no_collapse_lower_bound"):
        fit_points([pts[0], pts[2]])


def test_budgets_that_grow_with_size_give_a_law_in_n_alone():
    # 20 tokens per parameter: D moves with N, so D cannot be a separate term.
    pts = [point(n, 20 * n, 3e-3 * n**0.3) for n in (1e6, 1e7, 1e8)]
    law = fit_points(pts)
    assert not law.use_tokens and law.exponent == pytest.approx(0.3)
    assert "cannot be separated" in law.note and "20" in law.note
    with pytest.raises(LawInputError, match="cannot be separated"):
        fit_points(pts, terms="N,D")
    plain = fit_points([point(n, 1e9, 3e-3 * n**0.3) for n in (1e6, 1e7)], terms="N")
    assert plain.note == "" and not plain.use_tokens


def test_leave_largest_out_on_an_exact_law():
    pts = [point(n, 1e9, 3e-3 * n**0.3) for n in (1e6, 1e7, 1e8)]
    check = leave_largest_out(fit_points(pts), fit_points)
    assert check["possible"] and check["held_out_model_params"] == 1e8
    (c,) = check["points"]
    assert c["rel_error"] == pytest.approx(0.0, abs=1e-9)
    assert c["inside"] and c["intervals_overlap"]
    two = leave_largest_out(fit_points(pts[:2]), fit_points)
    assert not two["possible"] and "3 or more" in two["reason"]


def test_fit_recovers_a_known_exponent_from_a_noisy_table(make_rows):
    # CP = 3e-3 * N^0.3, 5 sizes, 9 infusion levels, 2 seeds each, binomial accuracy noise
    # over 400 probes (the real evaluator's noise), fixed seed.
    rows = make_rows(seeds=2, seed=1)
    a = analyze(rows, Options(chance=0.2, n_boot=60), target="1e9")
    assert all(p.status == COLLAPSE for p in a.points)
    assert a.law.exponent == pytest.approx(0.3, rel=0.05)
    lo, hi = a.law.coef_ci(1)
    assert lo < 0.3 < hi
    truth = 3e-3 * 1e9**0.3
    assert a.prediction["collapse_infusion"] == pytest.approx(truth, rel=0.15)
    assert a.heldout["possible"]
    assert abs(a.heldout["points"][0]["rel_error"]) < 0.15


def test_law_over_several_budgets_from_a_noisy_table(make_rows):
    rows = make_rows(sizes=(1e6, 1e7, 1e8), tokens=(1e9, 1e10), c=0.2, seed=3)
    a = analyze(rows, Options(chance=0.2, n_boot=40))
    assert a.law.use_tokens
    assert a.law.exponent == pytest.approx(0.3, abs=0.03)
    assert a.law.tokens_exponent == pytest.approx(0.2, abs=0.04)


def test_chance_auto_uses_the_logged_chance(make_rows):
    rows = make_rows(sizes=(1e6, 1e8), seed=2)
    rows += [dict(r, metric="retention_chance/domain", value=0.2) for r in rows]
    auto = analyze(rows, Options(chance="auto", n_boot=20))
    fixed = analyze(rows, Options(chance=0.2, n_boot=20))
    assert auto.options.chance == pytest.approx(0.2)
    assert auto.law.exponent == pytest.approx(fixed.law.exponent, rel=1e-9)
    with pytest.raises(LawInputError, match="retention_chance/general"):
        analyze(rows, Options(metric="retention/general", chance="auto"))


def test_too_narrow_infusion_range_cannot_give_a_law(make_rows):
    # Every curve's collapse lies beyond the largest measured infusion.
    rows = make_rows(levels=np.geomspace(1e-3, 0.05, 6))
    with pytest.raises(LawInputError, match="no law can be fitted") as e:
        analyze(rows, Options(chance=0.2, n_boot=10))
    assert "widen the infusion range" in str(e.value)


@pytest.mark.parametrize("text,message", [("abc", "numbers"), ("1e9,0", "> 0"), ("1,2,3", "N or N,D")])
def test_bad_prediction_target(text, message):
    with pytest.raises(LawInputError, match=message):
        parse_target(text)


def test_bad_options(make_rows):
    rows = make_rows(sizes=(1e6, 1e8))
    for opts, message in [
        (Options(fraction=1.5), "--fraction"),
        (Options(n_boot=3), "--bootstrap"),
        (Options(confidence=1.0), "--confidence"),
        (Options(chance="maybe"), "--chance"),
    ]:
        with pytest.raises(LawInputError, match=message):
            analyze(rows, opts)
