"""The law's forms (kis_megatron/law/forms.py): gradients against finite differences, the
paper's law as a member of each exposure form, a stored form predicting what it predicted,
and the joint fit recovering a known floor."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kis_megatron.law.analysis import Options, analyze
from kis_megatron.law.exposure import exposure_accounting
from kis_megatron.law.forms import FORMS, Covariates, Form
from kis_megatron.law.simulate import ExposureTruth, LadderSpec, simulate_rows
from kis_megatron.law.table import select_curves

SIZES = np.array([5e4, 1.5e5, 3e5, 5e5, 1e6])
COV = Covariates.of(SIZES, 6e5, 12000.0)
THETA = {"power": np.array([-0.8, 0.6]), "floor": np.array([15.0, 1.4, 0.9]),
         "broken": np.array([1.5, 0.8, 0.2, 0.1])}


@pytest.mark.parametrize("name", list(FORMS))
def test_gradients_match_finite_differences(name):
    form = FORMS[name](COV, False)
    theta = THETA[name]
    x, grad = form.xc(theta, COV, grad=True)
    for j in range(theta.size):
        step = np.zeros_like(theta)
        step[j] = 1e-6
        numeric = (form.xc(theta + step, COV) - form.xc(theta - step, COV)) / 2e-6
        np.testing.assert_allclose(grad[:, j], numeric, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", list(FORMS))
def test_replicates_evaluate_at_once_and_states_round_trip(name):
    form = FORMS[name](COV, False)
    reps = np.stack([THETA[name] * (1 + 0.01 * r) for r in range(3)])
    at_once = form.xc(reps, COV)
    assert at_once.shape == (3, SIZES.size)
    for r in range(3):
        np.testing.assert_allclose(at_once[r], form.xc(reps[r], COV), rtol=1e-12)
    again, theta = Form.from_state(form.state(THETA[name]))
    np.testing.assert_allclose(again.xc(theta, COV), form.xc(THETA[name], COV), rtol=1e-12)


def test_the_paper_law_is_the_floor_at_zero_and_the_broken_law_without_a_bend():
    power = FORMS["power"](COV, False)
    floor = FORMS["floor"](COV, False)
    broken = FORMS["broken"](COV, False)
    a, b = 0.2, 0.6  # CP = a N^b  <=>  E* = R / (a N^b) = (R / (a N0^b)) (N / N0)^-b
    log_a_exp = math.log10(12000.0 / (a * 10 ** (b * floor.n0)))
    expected = math.log10(a) + b * np.log10(SIZES)
    np.testing.assert_allclose(power.xc(np.array([math.log10(a), b]), COV), expected, rtol=1e-12)
    np.testing.assert_allclose(floor.xc(np.array([0.0, log_a_exp, b]), COV), expected, rtol=1e-12)
    np.testing.assert_allclose(broken.xc(np.array([log_a_exp, b, b, 0.0]), COV), expected, rtol=1e-12)


def test_a_floor_reached_inside_the_ladder_is_recovered_and_selected():
    # five sizes, every run measured exactly (a million probes): the floor form recovers
    # E_inf and alpha, and the selection prefers it to the paper's law
    truth = ExposureTruth(alpha=1.5, e_inf=20.0)
    spec = LadderSpec(sizes=tuple(SIZES[:4]) + (8e5,), levels=(32, 64, 128, 256, 362, 512, 724, 1024, 2048),
                      truth=truth, probe_cap=10**6, plateau=(1.0, 1.0), width=(0.12, 0.12))
    rows, curves = simulate_rows(spec, np.random.default_rng(0))
    by_size = {t.model_params: t for t in curves}
    for r in rows:  # every value exact, as over a million probes
        r["value"], r["n_probes"] = float(by_size[r["model_params"]].retention(r["infusion"])), 10**6
    a = analyze(rows, Options(chance=0.2, n_boot=20))
    floor = a.selection.fits["floor"].law.parameters()
    assert floor["E_inf"] == pytest.approx(20.0, rel=0.05)
    assert floor["alpha"] == pytest.approx(1.5, rel=0.1)
    assert a.selection.selected == "floor"
    # E* = 22.0 at 5e5 and 21.0 at 8e5: a shallow top, N^-0.1 (N^-0.6 for the paper's law here)
    assert -0.2 < a.regime["top_slope"]["slope"] < 0.0


def test_exposure_accounting_reads_renderings_and_tokens_per_rendering():
    spec = LadderSpec(truth=ExposureTruth(renderings=12000.0, tokens_per_rendering=15.0))
    rows, _ = simulate_rows(spec, np.random.default_rng(1))
    curves, kind = select_curves(rows, spec.metric)
    acc, why = exposure_accounting(curves, kind)
    assert why == "" and acc.slope == -1.0
    assert acc.scales == pytest.approx([12000.0] * 4)
    assert acc.tokens_per_rendering == pytest.approx(15.0)
    assert acc.share == pytest.approx(12000.0 * 15.0 / spec.tokens[0])
    assert acc.scale_for(2 * spec.tokens[0]) == pytest.approx(24000.0)  # twice the budget, same share
    assert acc.scale_for(spec.tokens[0], share=acc.share / 2) == pytest.approx(6000.0)
    ratio_rows = [dict(r, infusion_kind="ratio") for r in rows]
    curves, kind = select_curves(ratio_rows, spec.metric)
    acc, why = exposure_accounting(curves, kind)
    assert acc is None and "facts knob" in why
