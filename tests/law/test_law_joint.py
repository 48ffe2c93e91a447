"""The joint fit and the validation of a larger held-out model, on data with a known law."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kis_megatron.law.analysis import Options, analyze
from kis_megatron.law.collapse import COLLAPSE, detect_collapse
from kis_megatron.law.joint import fit_curves
from kis_megatron.law.outputs import write_outputs
from kis_megatron.law.table import Curve, LawInputError, select_curves

SIZES = (1e6, 3e6, 1e7, 3e7)
LEVELS = np.geomspace(0.01, 4.0, 11)  # every curve reaches its plateau and its floor


def exact_curves(b=0.3, c=0.0, tokens=(1e9,), sizes=SIZES, width=0.1, chance=0.2, noise=0.0):
    """Retention curves whose collapse points follow CP = 3e-3 N^b (D/1e9)^c (noise-free, or
    with Gaussian noise of sd ``noise``)."""
    rng = np.random.default_rng(len(sizes))
    curves = []
    for d in tokens:
        for i, n in enumerate(sizes):
            cp = 3e-3 * n**b * (d / 1e9) ** c
            plateau = 0.9 + 0.02 * i  # every curve its own plateau and width
            w = width * (1 + 0.2 * i)
            y = chance + (plateau - chance) / (1 + np.exp((np.log10(LEVELS) - math.log10(cp)) / w))
            curves.append(Curve(n, d, LEVELS.copy(), y + noise * rng.standard_normal(y.size)))
    return curves


def test_joint_fit_recovers_an_exact_law():
    curves = exact_curves()
    points = [detect_collapse(c, chance=0.2, n_boot=20) for c in curves]
    law = fit_curves(curves, points, chance=0.2, n_boot=20)
    assert law.method == "joint"
    assert law.exponent == pytest.approx(0.3, abs=1e-6)
    assert law.coefficient == pytest.approx(3e-3, rel=1e-5)
    lo, hi = law.coef_ci(1)
    assert lo == pytest.approx(0.3, abs=1e-5) and hi == pytest.approx(0.3, abs=1e-5)  # no noise, no width


def test_joint_fit_recovers_a_budget_exponent():
    curves = exact_curves(b=0.3, c=0.25, tokens=(1e9, 4e9), sizes=SIZES[:3])
    points = [detect_collapse(c, chance=0.2, n_boot=20) for c in curves]
    law = fit_curves(curves, points, chance=0.2, n_boot=20)
    assert law.use_tokens
    assert law.exponent == pytest.approx(0.3, abs=1e-6)
    assert law.tokens_exponent == pytest.approx(0.25, abs=1e-6)


def test_joint_fit_with_a_free_floor():
    curves = exact_curves()
    points = [detect_collapse(c, n_boot=20) for c in curves]
    assert all(p.status == COLLAPSE for p in points)
    law = fit_curves(curves, points, chance=None, n_boot=20)
    assert law.exponent == pytest.approx(0.3, abs=1e-4)


def test_joint_fit_needs_two_located_sizes():
    curves = exact_curves(sizes=SIZES[:1])
    points = [detect_collapse(c, chance=0.2, n_boot=20) for c in curves]
    with pytest.raises(LawInputError, match="at least 2"):
        fit_curves(curves, points, chance=0.2, n_boot=20)


def test_repeated_runs_are_resampled_within_their_level(make_rows):
    rows = make_rows(sizes=(1e6, 1e7, 1e8), seeds=3, seed=5)
    a = analyze(rows, Options(chance=0.2, n_boot=60))
    assert a.law.method == "joint"
    lo, hi = a.law.coef_ci(1)
    assert lo < 0.3 < hi and 0 < hi - lo < 0.2


def table_rows(curves, metric="retention/domain"):
    return [{"model_params": c.model_params, "tokens": c.tokens, "infusion": float(x),
             "metric": metric, "value": float(y), "infusion_kind": "ratio"}
            for c in curves for x, y in zip(c.infusion, c.value)]


def test_validation_compares_the_prediction_with_the_measured_collapse():
    ladder = table_rows(exact_curves(noise=0.01))
    held = table_rows(exact_curves(sizes=(1e8,), noise=0.01))
    a = analyze(ladder, Options(chance=0.2, n_boot=200), validation_rows=held)
    v = a.validation
    truth = 3e-3 * 1e8**0.3
    assert set(v) >= {"model_params", "tokens", "predicted", "interval", "measured", "measured_ci",
                      "rel_error", "inside"}
    assert v["model_params"] == 1e8 and v["tokens"] == 1e9
    assert v["predicted"] == pytest.approx(truth, rel=0.05)
    assert v["measured"] == pytest.approx(truth, rel=0.05)
    assert v["rel_error"] == pytest.approx((v["predicted"] - v["measured"]) / v["measured"])
    assert v["inside"] and v["interval"][0] < v["predicted"] < v["interval"][1]
    assert v["extrapolation"] == pytest.approx(1e8 / 3e7)
    assert a.law.points and all(p.model_params != 1e8 for p in a.law.points)  # not fitted on


def test_a_validation_that_misses_says_so():
    ladder = table_rows(exact_curves())
    wrong = table_rows([Curve(1e8, 1e9, c.infusion, c.value) for c in exact_curves(sizes=(1e6,))])
    v = analyze(ladder, Options(chance=0.2, n_boot=50), validation_rows=wrong).validation
    assert v["rel_error"] > 1.0 and not v["inside"]


def test_validation_input_errors():
    ladder = table_rows(exact_curves())
    with pytest.raises(LawInputError, match="held-out size"):
        analyze(ladder, Options(chance=0.2, n_boot=20), validation_rows=table_rows(exact_curves(sizes=(3e7,))))
    with pytest.raises(LawInputError, match="one model size"):
        analyze(ladder, Options(chance=0.2, n_boot=20),
                validation_rows=table_rows(exact_curves(sizes=(1e8, 3e8))))


def test_a_validation_curve_that_never_falls_is_a_bound():
    ladder = table_rows(exact_curves())
    flat = table_rows([Curve(1e8, 1e9, LEVELS.copy(), np.full(LEVELS.size, 0.95))])
    v = analyze(ladder, Options(chance=0.2, n_boot=20), validation_rows=flat).validation
    assert v["measured"] is None and v["rel_error"] is None and not v["inside"]
    assert v["measured_bound"] == pytest.approx(LEVELS[-1]) and "bound" in v["note"]


def test_outputs_with_validation_and_a_point_outside_its_interval(tmp_path):
    ladder = table_rows(exact_curves(noise=0.01))
    held = table_rows(exact_curves(sizes=(1e8,), noise=0.01))
    a = analyze(ladder, Options(chance=0.2, n_boot=200), validation_rows=held)
    p = a.points[0]
    p.ci = (p.collapse_infusion * 1.1, p.collapse_infusion * 1.3)  # a percentile interval can miss its point
    out = tmp_path / "law"
    write_outputs(a, str(out))
    (out / "notes.txt").write_text("mine")  # a user's file beside an earlier output
    write_outputs(a, str(out))
    doc = json.loads((out / "law.json").read_text())
    assert doc["validation"]["inside"] is True
    assert (out / "validation.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "## Validation on a larger model" in report and "(outside its CI)" in report
    assert (out / "notes.txt").read_text() == "mine"  # not ours: left alone
    a.validation = None  # a later fit without validation removes its own stale plot only
    write_outputs(a, str(out))
    assert not (out / "validation.png").exists() and (out / "notes.txt").exists()
    assert set(json.loads((out / "law.json").read_text())["outputs"]) == \
        {"law.json", "report.md", "retention_curves.png", "law.png"}


def test_two_stage_remains_an_option(make_rows):
    rows = make_rows(sizes=(1e6, 1e7, 1e8), seed=4)
    a = analyze(rows, Options(chance=0.2, n_boot=40, fit="two-stage"))
    assert a.law.method == "two-stage" and a.heldout["possible"] is True
    curves, _ = select_curves(rows, "retention/domain")
    assert len(curves) == 3
    with pytest.raises(LawInputError, match="--fit"):
        analyze(rows, Options(fit="one-stage"))
