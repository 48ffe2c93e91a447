"""Which form of the law the ladder supports, and a prediction whose interval spans the forms
the ladder cannot tell apart.

The rule (developed on simulated ladders, draws 0-29 of benchmarks/bench_law_forms.py, and
recorded on fresh draws 1000-1049: benchmarks/RESULTS.md; tests/law/test_law_select_simulated.py
asserts its thresholds):

1. Fit every form the data allow (forms.py): the power form always; the exposure forms when
   the knob is a number of facts with logged exposures, each with located collapse points at
   as many model sizes as it has parameters in N and D.  All fitted forms are reported.
2. Eligible for selection are the forms that can be checked out of sample: located points at
   one size more than their parameters in N, so the largest size can be left out, the form
   refitted without it and its prediction of that size compared with the measured point
   (``agreement``: the difference inside the 95% interval of the difference).  On a 4-size
   ladder that is the power and floor forms; the broken power law needs 5 sizes.
3. Score each by AICc on the joint fit's residuals (n measurements, P fitted parameters, the
   curves' own plateaus and widths included, +1 for the noise):
   AICc = n ln(RSS / n) + 2P + 2P(P + 1) / (n - P - 1).
4. The candidate is the eligible form with the lowest AICc.  If it misses its held-out size
   and an eligible form that contains it (floor and broken contain power: E_inf = 0,
   alpha1 = alpha2) does not, the containing form is selected: the out-of-sample miss is
   evidence against the simpler form that the likelihood's penalty would overrule.
5. The prediction is the selected form's value; its interval spans, from the lowest lower
   end to the highest upper end, the intervals of every eligible form whose AICc is within 10
   of the best (beyond 10 a form has essentially no support).  A 4-size ladder cannot tell a
   power law from a floor reached just beyond it (the likelihood differs by a few units, and
   the held-out check of one size misses either form about as often), so both stay in the
   interval: the doubt over the form is in the interval, not only the probes' noise.

Development (draws 0-29, recorded in benchmarks/RESULTS.md): an earlier version kept in the
interval only the forms within 2 of the best AICc that did not miss their held-out size, or
that contained the selected form; it covered the truth in 90 / 83 / 87% of the power, floor-
inside and floor-beyond ladders, because a true form missed its held-out size by chance.
With a seed's shift of whole curves (0.07 decades, as d192's two seeds suggest) no version
meets the thresholds on a 4-size single-seed ladder (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint
from kis_megatron.law.exposure import ExposureAccounting
from kis_megatron.law.fit import LawFit
from kis_megatron.law.forms import FORM_NAMES, FORMS
from kis_megatron.law.table import Curve, LawInputError

NO_SUPPORT_DELTA = 10.0  # AICc more than this above the best: no support (Burnham & Anderson)


@dataclass
class FormFit:
    """One form's fit, scores and held-out check (``law`` None: not fitted, ``reason`` why)."""

    name: str
    law: LawFit | None = None
    reason: str = ""
    aicc: float = math.inf
    delta: float = math.inf
    heldout: dict = field(default_factory=dict)
    eligible: bool = False
    credible: bool = False

    @property
    def heldout_missed(self) -> bool:
        return bool(self.heldout.get("possible")) and not all(p.get("inside") for p in self.heldout["points"])


@dataclass
class Selection:
    fits: dict[str, FormFit]
    selected: str
    credible: list[str]
    accounting: ExposureAccounting | None
    note: str = ""

    @property
    def law(self) -> LawFit:
        return self.fits[self.selected].law

    def scale(self, d: float | None, share: float | None = None) -> float | None:
        if self.accounting is None or d is None:
            return None
        return self.accounting.scale_for(d, share)

    def log10_replicates(self, n: float, d: float | None, share: float | None = None) -> dict:
        """Each credible form's log10 prediction and replicates at one target trained on ``d``
        tokens (None: the ladder's budget; a law without a D term uses D only for the
        target's renderings)."""
        d_eff = d if d is not None else self.ladder_budget()
        k = self.scale(d_eff, share)
        out = {}
        for name in self.credible:
            law = self.fits[name].law
            value, reps = law.predict_log10(n, d if law.use_tokens else None, k)
            out[name] = (float(value[0]), reps[:, 0])
        return out

    def ladder_budget(self) -> float:
        return float(np.median([p.tokens for p in self.law.points]))

    def predict(self, n: float, d: float | None, share: float | None = None) -> dict:
        """The selected form's prediction with the interval spanning the credible forms."""
        alpha = (1.0 - self.law.confidence) / 2
        per_form = {}
        for name, (value, reps) in self.log10_replicates(n, d, share).items():
            lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
            per_form[name] = {"collapse_infusion": 10**value, "interval": [10**lo, 10**hi]}
        lo = min(f["interval"][0] for f in per_form.values())
        hi = max(f["interval"][1] for f in per_form.values())
        return {"collapse_infusion": per_form[self.selected]["collapse_infusion"],
                "interval": [lo, hi], "form": self.selected, "per_form": per_form}


def aicc(law: LawFit) -> float:
    """AICc of a joint fit from its residuals (module docstring, step 2)."""
    n, p = law.n_obs, law.n_params + 1
    if law.rss is None or n - p - 1 <= 0:
        return math.inf
    return n * math.log(max(law.rss, 1e-300) / n) + 2 * p + 2 * p * (p + 1) / (n - p - 1)


def agreement(predicted: float, interval, measured: float, measured_ci) -> dict:
    """A predicted against a measured collapse point: relative error, and whether they agree
    within the 95% interval of their difference (in log10: the predicted interval's and the
    measured interval's half-widths on the side between them, added in quadrature), and
    whether the measured point lies inside the predicted interval alone."""
    lp, lm = math.log10(predicted), math.log10(measured)
    if lm >= lp:
        h_p, h_m = math.log10(interval[1]) - lp, lm - math.log10(measured_ci[0])
    else:
        h_p, h_m = lp - math.log10(interval[0]), math.log10(measured_ci[1]) - lm
    return {
        "rel_error": (predicted - measured) / measured,
        "inside": bool(abs(lp - lm) <= math.hypot(max(h_p, 0.0), max(h_m, 0.0))),
        "inside_prediction_interval": bool(interval[0] <= measured <= interval[1]),
    }


CONTAINS = {"floor": ("power",), "broken": ("power",)}  # forms that nest others


def select_form(curves: list[Curve], points: list[CollapsePoint], fit_form, *,
                accounting: ExposureAccounting | None, unavailable: str = "",
                forms: tuple[str, ...] = FORM_NAMES) -> Selection:
    """Fit the ``forms`` (``fit_form(curves, points, name, scales)`` -> LawFit) and select
    by the module's rule."""
    fits = {}
    sizes = len({p.model_params for p in points if p.status == COLLAPSE})
    for name in forms:
        f = FormFit(name)
        if FORMS[name].uses_exposures and accounting is None:
            f.reason = unavailable
        else:
            scales = accounting.scales if accounting is not None else None
            try:
                f.law = fit_form(curves, points, name, scales)
            except LawInputError as e:
                if name == "power":
                    raise
                f.reason = str(e)
        if f.law is not None:
            f.aicc = aicc(f.law)
            f.heldout = _leave_largest_out(curves, points, fit_form, name, accounting, f.law)
            k_n = f.law.form.k_n
            f.eligible = sizes >= k_n + 1 and f.heldout.get("possible", False)
            if not f.eligible:
                f.reason = (f"reported, not selectable: {k_n} parameters in N need located "
                            f"collapse points at {k_n + 1} sizes to be checked out of sample "
                            f"(this ladder has {sizes})")
        fits[name] = f
    eligible = [f for f in fits.values() if f.law is not None and f.eligible] or [fits["power"]]
    best = min(f.aicc for f in eligible)
    for f in fits.values():
        if f.law is not None and math.isfinite(best):
            f.delta = f.aicc - best
    candidate = min(eligible, key=lambda f: (f.aicc, FORM_NAMES.index(f.name)))
    chosen, note = candidate, ""
    if candidate.heldout_missed:
        wider = [f for f in eligible if candidate.name in CONTAINS.get(f.name, ()) and not f.heldout_missed]
        if wider:
            chosen = min(wider, key=lambda f: f.aicc)
            note = (f"{candidate.name} has the lowest AICc but misses the largest size when it is "
                    f"left out; {chosen.name}, which contains it, does not and is selected")
        else:
            note = f"{candidate.name} misses the largest size when it is left out, and no form that contains it does better"
    credible = [chosen] + [f for f in eligible if f is not chosen and f.delta <= NO_SUPPORT_DELTA]
    for f in credible:
        f.credible = True
    return Selection(fits, chosen.name, [f.name for f in credible], accounting, note)


def _leave_largest_out(curves, points, fit_form, name, accounting, full: LawFit) -> dict:
    """Refit ``name`` without the largest size and check its prediction of that size."""
    located = [p for p in points if p.status == COLLAPSE]
    largest = max(p.model_params for p in located)
    keep = [i for i, c in enumerate(curves) if c.model_params != largest]
    rest = [curves[i] for i in keep]
    try:
        law = fit_form(rest, [points[i] for i in keep], name,
                       [accounting.scales[i] for i in keep] if accounting is not None else None)
    except LawInputError as e:
        return {"possible": False, "reason": str(e)}
    if law.use_tokens != full.use_tokens:
        return {"possible": False,
                "reason": "without the largest size, the remaining points span one token budget"}
    checks = []
    for i, (c, p) in enumerate(zip(curves, points)):
        if c.model_params != largest or p.status != COLLAPSE:
            continue
        k = accounting.scales[i] if accounting is not None else None
        value, lo, hi = (float(v[0]) for v in law.predict(c.model_params, c.tokens, k))
        checks.append({"model_params": c.model_params, "tokens": c.tokens, "predicted": value,
                       "interval": [lo, hi], "measured": p.collapse_infusion,
                       "measured_ci": list(p.ci), "status": p.status}
                      | agreement(value, (lo, hi), p.collapse_infusion, p.ci))
    return {"possible": True, "held_out_model_params": largest,
            "fitted_on_sizes": sorted({c.model_params for c in rest}),
            "parameters_without_largest": law.parameters(), "points": checks}
