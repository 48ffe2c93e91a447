"""Simulated ladders with a known law, to test the law tools where the truth is known.

Two kinds of truth: the paper's CP = a N^b D^c (``LadderSpec`` alone), or a law in exposures
(``ExposureTruth``): E*(N) = E_inf + (E_small - E_inf) (N / N_smallest)^-alpha, CP = R / E*,
which is the pure power law when E_inf = 0 and bends to a floor otherwise; its runs log the
exposure accounting the exposure forms read (exposures per fact R / F, domain tokens).

A ladder is a set of retention curves, one per model size N (and token budget D), whose
collapse points follow CP = a * N^b * D^c exactly.  Each curve is the step the detector
fits (plateau, chance floor, width in decades of infusion), and each run's retention is a
multiple-choice accuracy over ``min(level, probe_cap)`` probes (one probe per fact when the
infusion is a number of facts), drawn from the binomial, optionally with run-to-run noise on
the logit scale (``seed_sd``, as between training seeds).  The defaults mirror the tiny CPU
ladder (examples/tiny_ladder): its four sizes, a 5.6x larger held-out size, levels of
domain facts, plateaus near 1 and falls 0.08-0.2 decades wide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logit

from kis_megatron.law.table import Curve


@dataclass(frozen=True)
class ExposureTruth:
    """Needed exposures per fact E*(N) = e_inf + (e_small - e_inf) (N / n_small)^-alpha over
    ``renderings`` R of the infused set per run (one budget)."""

    renderings: float = 12100.0
    e_small: float = 85.0
    alpha: float = 0.6
    e_inf: float = 0.0
    n_small: float = 57504.0
    tokens_per_rendering: float = 15.2

    def exposures(self, n) -> np.ndarray:
        n = np.asarray(n, dtype=float)
        return self.e_inf + (self.e_small - self.e_inf) * (n / self.n_small) ** -self.alpha

    def cp(self, n) -> np.ndarray:
        return self.renderings / self.exposures(n)


@dataclass(frozen=True)
class LadderSpec:
    sizes: tuple[float, ...] = (57504.0, 155968.0, 295392.0, 524928.0)
    heldout: float = 1_030_000.0
    tokens: tuple[float, ...] = (614400.0,)
    b: float = 0.3
    c: float = 0.0
    cp_smallest: float = 80.0  # CP of the smallest size at the first budget (sets a)
    levels: tuple[float, ...] = (32, 64, 128, 256, 512, 1024)
    plateau: tuple[float, float] = (0.9, 1.0)
    width: tuple[float, float] = (0.08, 0.2)
    chance: float = 0.2
    probe_cap: int = 256
    seeds: int = 1
    seed_sd: float = 0.0  # run-to-run noise on the logit (every run its own draw)
    curve_sd: float = 0.0  # a seed's shift of a whole curve's collapse point, in decades
    metric: str = "retention/domain"
    truth: ExposureTruth | None = None  # a law in exposures instead of a, b, c

    @property
    def a(self) -> float:
        return self.cp_smallest / (self.sizes[0] ** self.b * self.tokens[0] ** self.c)

    def true_cp(self, n, d=None) -> np.ndarray:
        if self.truth is not None:
            return self.truth.cp(n)
        d = self.tokens[0] if d is None else d
        return self.a * np.asarray(n, dtype=float) ** self.b * np.asarray(d, dtype=float) ** self.c


@dataclass
class TrueCurve:
    """One curve's ground truth; ``measure`` draws runs of it."""

    model_params: float
    tokens: float
    cp: float
    plateau: float
    width: float
    spec: LadderSpec = field(repr=False)
    shifts: tuple[float, ...] = ()  # per seed: the shift of log10 CP (spec.curve_sd)

    def retention(self, level, seed: int = 0) -> np.ndarray:
        x = np.log10(np.asarray(level, dtype=float))
        s = self.spec
        xc = math.log10(self.cp) + (self.shifts[seed] if seed < len(self.shifts) else 0.0)
        return s.chance + (self.plateau - s.chance) * expit(-(x - xc) / self.width)

    def measure(self, levels, rng: np.random.Generator, seeds: int | None = None) -> list[dict]:
        """Table rows of ``seeds`` runs at each level."""
        s = self.spec
        rows = []
        for level in np.atleast_1d(levels):
            n_probes = int(min(level, s.probe_cap)) if s.probe_cap else 256
            for seed in range(s.seeds if seeds is None else seeds):
                p0 = float(np.clip(self.retention(level, seed), 1e-6, 1 - 1e-6))
                p = float(expit(logit(p0) + s.seed_sd * rng.standard_normal())) if s.seed_sd else p0
                row = {
                    "model_params": self.model_params, "tokens": self.tokens,
                    "infusion": float(level), "metric": s.metric,
                    "value": rng.binomial(n_probes, p) / n_probes, "seed": seed, "n_probes": n_probes,
                    "run_id": f"n{self.model_params:g}-d{self.tokens:g}-x{level:g}-s{seed}",
                }
                if s.truth is not None:
                    t = s.truth
                    row.update(exposures=t.renderings / float(level), infusion_kind="domain_facts",
                               domain_tokens=t.renderings * t.tokens_per_rendering)
                rows.append(row)
        return rows


def draw_truth(spec: LadderSpec, rng: np.random.Generator, sizes=None) -> list[TrueCurve]:
    """One ladder's true curves (plateau and width drawn per curve)."""
    curves = []
    for d in spec.tokens:
        for n in (spec.sizes if sizes is None else sizes):
            curve = TrueCurve(float(n), float(d), float(spec.true_cp(n, d)),
                              float(rng.uniform(*spec.plateau)), float(rng.uniform(*spec.width)), spec)
            if spec.curve_sd:
                curve.shifts = tuple(float(v) for v in spec.curve_sd * rng.standard_normal(max(spec.seeds, 8)))
            curves.append(curve)
    return curves


def simulate_rows(spec: LadderSpec, rng: np.random.Generator) -> tuple[list[dict], list[TrueCurve]]:
    """Rows of a whole ladder on the spec's fixed levels, and its true curves."""
    truth = draw_truth(spec, rng)
    rows = [r for t in truth for r in t.measure(spec.levels, rng)]
    return rows, truth


def rows_to_curve(rows: list[dict]) -> Curve:
    r0 = rows[0]
    x = np.array([r["infusion"] for r in rows], dtype=float)
    y = np.array([r["value"] for r in rows], dtype=float)
    k = np.array([r["n_probes"] for r in rows], dtype=float)
    order = np.argsort(x, kind="stable")
    return Curve(r0["model_params"], r0["tokens"], x[order], y[order], k[order])


# -- the form-selection regimes (benchmarks/bench_law_forms.py, tests/law/test_law_select_simulated.py)

FORM_LEVELS = (32, 64, 128, 256, 512, 1024, 2048)
FORM_REGIMES = {  # name: (the true form, the truth, whether a 4-size ladder can tell)
    "power": ("power", ExposureTruth(alpha=0.6, e_inf=0.0), True),
    "floor inside": ("floor", ExposureTruth(alpha=1.5, e_inf=20.0), True),
    "floor beyond": ("floor", ExposureTruth(alpha=0.9, e_inf=8.0), False),
}


def form_regime_spec(regime: str, curve_sd: float) -> LadderSpec:
    """The tiny ladder's 4 sizes under ``regime``, doubling levels, run noise 0.1 on the
    logit, a seed's shift of each curve of ``curve_sd`` decades, held-out size 2x the largest."""
    return LadderSpec(levels=FORM_LEVELS, heldout=2 * 524928.0, seeds=1, seed_sd=0.1,
                      curve_sd=curve_sd, truth=FORM_REGIMES[regime][1])


def form_selection_draw(regime: str, draw: int, curve_sd: float, n_boot: int) -> dict:
    """One simulated ladder through fit_law's own analysis: the selected form, the credible
    forms, the prediction for the held-out size against the truth, and every form's own."""
    from kis_megatron.law.analysis import Options, analyze  # the analysis imports nothing here
    from kis_megatron.law.table import LawInputError

    spec = form_regime_spec(regime, curve_sd)
    rows, _ = simulate_rows(spec, np.random.default_rng([draw, 17]))
    truth = float(spec.true_cp(spec.heldout))
    try:
        a = analyze(rows, Options(chance=spec.chance, n_boot=n_boot, seed=draw), f"{spec.heldout}")
    except LawInputError as e:
        return {"regime": regime, "draw": draw, "failed": str(e)}
    sel = a.selection
    k = sel.scale(spec.tokens[0])
    forms = {}
    for name, f in sel.fits.items():
        if f.law is None:
            forms[name] = {"reason": f.reason}
            continue
        value, lo, hi = (float(v[0]) for v in f.law.predict(spec.heldout, None, k))
        forms[name] = {"aicc": f.aicc, "delta": f.delta, "credible": f.credible,
                       "llo_possible": bool(f.heldout.get("possible")), "llo_missed": f.heldout_missed,
                       "pred": value, "lo": lo, "hi": hi}
    p = a.prediction
    return {"regime": regime, "draw": draw, "truth": truth, "selected": sel.selected,
            "credible": sel.credible, "pred": p["collapse_infusion"], "lo": p["interval"][0],
            "hi": p["interval"][1], "forms": forms}


def summarize_selection(results: list[dict], regime: str) -> dict:
    """Selection accuracy, coverage, error and interval half-width of one regime's draws."""
    true_form = FORM_REGIMES[regime][0]
    rs = [r for r in results if r["regime"] == regime and "failed" not in r]
    picks = [r["selected"] for r in rs]
    return {
        "n": len(rs), "failed": sum(1 for r in results if r["regime"] == regime and "failed" in r),
        "right": float(np.mean([p == true_form for p in picks])),
        "picked": {f: picks.count(f) for f in ("power", "floor", "broken")},
        "cover": float(np.mean([r["lo"] <= r["truth"] <= r["hi"] for r in rs])),
        "error": float(np.median([abs(r["pred"] / r["truth"] - 1) for r in rs])),
        "half_width": float(np.median([(r["hi"] / r["lo"]) ** 0.5 - 1 for r in rs])),
    }
