"""Selecting the law's form (kis_megatron/law/select.py) and the recommendation
(kis_megatron/law/recommend.py), on ladders with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kis_megatron.law.analysis import Options, analyze
from kis_megatron.law.recommend import parse_recommend
from kis_megatron.law.select import agreement
from kis_megatron.law.simulate import ExposureTruth, LadderSpec, simulate_rows
from kis_megatron.law.table import LawInputError

LEVELS = (32, 64, 128, 181, 256, 362, 512, 724, 1024, 2048)


def exact_rows(truth: ExposureTruth, sizes=(57504.0, 155968.0, 295392.0, 524928.0), width=0.12):
    """Runs measured without noise (a million probes each)."""
    spec = LadderSpec(sizes=sizes, levels=LEVELS, truth=truth, probe_cap=10**6,
                      plateau=(1.0, 1.0), width=(width, width))
    rows, truth = simulate_rows(spec, np.random.default_rng(0))
    by_size = {t.model_params: t for t in truth}
    for r in rows:
        r["value"], r["n_probes"] = float(by_size[r["model_params"]].retention(r["infusion"])), 10**6
    return rows, spec


def test_agreement_adds_both_intervals():
    a = agreement(100.0, (80.0, 125.0), 130.0, (120.0, 140.0))
    assert a["rel_error"] == pytest.approx(100 / 130 - 1)
    assert not a["inside_prediction_interval"]
    # log10 distance 0.114, half-widths 0.0969 and 0.0348: hypot 0.103 < 0.114
    assert not a["inside"]
    b = agreement(100.0, (80.0, 125.0), 130.0, (100.0, 160.0))
    assert b["inside"] and not b["inside_prediction_interval"]


def test_a_pure_power_law_is_selected_and_its_interval_spans_the_floor():
    # binomial noise over one probe per fact (exact data would leave AICc no residual)
    spec = LadderSpec(levels=LEVELS, truth=ExposureTruth(alpha=0.6, e_inf=0.0), probe_cap=4096)
    rows, _ = simulate_rows(spec, np.random.default_rng(3))
    a = analyze(rows, Options(chance=0.2, n_boot=30), "1.05e6")
    sel = a.selection
    assert sel.selected == "power"
    assert sel.fits["broken"].law is not None and not sel.fits["broken"].eligible  # 4 sizes
    truth = float(spec.true_cp(1.05e6))
    assert a.prediction["collapse_infusion"] == pytest.approx(truth, rel=0.02)
    lo, hi = a.prediction["interval"]
    assert lo <= truth <= hi
    assert "floor" in sel.credible  # it contains the power law and agrees on the largest size
    assert a.prediction["per_form"]["floor"]["interval"][0] == pytest.approx(lo)


def test_a_power_law_that_misses_its_largest_size_gives_way_to_the_floor():
    # a floor reached inside the ladder: the power law refitted without the largest size
    # overpredicts it, the floor does not; the floor is selected and predicts the held-out size
    rows, spec = exact_rows(ExposureTruth(alpha=1.5, e_inf=20.0), width=0.1)
    a = analyze(rows, Options(chance=0.2, n_boot=30), "1.05e6")
    sel = a.selection
    assert sel.fits["power"].heldout_missed
    assert sel.selected == "floor"
    assert a.prediction["collapse_infusion"] == pytest.approx(float(spec.true_cp(1.05e6)), rel=0.05)


def test_the_recommendation_keeps_retention_at_q_of_the_plateau():
    truth = ExposureTruth(alpha=0.6, e_inf=0.0)
    rows, spec = exact_rows(truth, width=0.12)
    a = analyze(rows, Options(chance=0.2, n_boot=40, retain=0.9), None, None, "1.05e6,614400")
    r = a.recommendation
    # true retention at the central recommendation: 0.2 + 0.8 sigmoid(-(x - x_c) / w) = 0.9
    x_c = math.log10(float(spec.true_cp(1.05e6)))
    retention = 0.2 + 0.8 / (1 + math.exp((math.log10(r["facts_central"]) - x_c) / 0.12))
    assert retention == pytest.approx(0.9, abs=0.01)
    assert r["facts"] <= r["facts_central"]  # the one-sided bound lies below
    assert r["exposures_per_fact"] == pytest.approx(r["renderings"] / r["facts"])
    assert r["supported"] is True  # 2x the largest size, at the ladder's budget
    far = analyze(rows, Options(chance=0.2, n_boot=20), None, None, "1e8,614400,0.3").recommendation
    assert far["supported"] is False and "outside the supported sizes" in far["unsupported_because"]


@pytest.mark.parametrize("text", ["7e9", "7e9,x", "7e9,1e11,1.5", "7e9,-1", "1,2,3,4"])
def test_bad_recommend_targets_name_the_option(text):
    with pytest.raises(LawInputError, match="--recommend"):
        parse_recommend(text)
