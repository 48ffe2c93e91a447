"""Which regime the ladder is in, and how far a prediction from it reaches.

- Exposures at collapse: E* = K * CP^s per located curve (s = -1 for facts: E* = R / CP),
  with the interval of its collapse point carried over.
- The top-of-ladder test: the slope of log10 E* on log10 N between the two largest sizes
  (at the largest budget that has two located sizes), with a percentile interval from the
  curves' own bootstrap replicates.  It does not presume a form.  "Still falling" when the
  whole 95% interval is below 0: more parameters still buy fewer needed exposures; otherwise
  the ladder cannot tell its top from a floor.
- Support: a prediction is supported for sizes from the smallest fitted size up to 2x the
  largest (the held-out distance at which the simulated ladders tested coverage,
  benchmarks/RESULTS.md), up to the validated size when a validation passed (if larger),
  and only up to the largest fitted size when a validation failed; for budgets within the
  ladder's (or, when the budget grows with the size, at the ladder's tokens per parameter),
  since no extrapolation in D has been tested.
"""

from __future__ import annotations

import math

import numpy as np

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint
from kis_megatron.law.exposure import ExposureAccounting
from kis_megatron.law.table import Curve

EXTRAPOLATION = 2.0  # how far beyond the largest fitted size the simulations tested coverage
_TOL = 1.01  # budgets within 1% count as the ladder's


def exposures_at_collapse(curves: list[Curve], points: list[CollapsePoint],
                          accounting: ExposureAccounting) -> list[dict]:
    """E* with its interval for every located curve (module docstring)."""
    s = accounting.slope
    out = []
    for k, c, p in zip(accounting.scales, curves, points):
        if p.status != COLLAPSE:
            continue
        ends = sorted(k * v**s for v in p.ci)
        out.append({"model_params": c.model_params, "tokens": c.tokens,
                    "exposures": k * p.collapse_infusion**s, "interval": ends,
                    "renderings": k})
    return out


def top_slope(curves: list[Curve], points: list[CollapsePoint], accounting: ExposureAccounting,
              confidence: float = 0.95) -> dict:
    """The slope of log E* on log N between the two largest located sizes (module docstring)."""
    located = [(k, c, p) for k, c, p in zip(accounting.scales, curves, points)
               if p.status == COLLAPSE and p.boot_log10 is not None]
    budgets = sorted({c.tokens for _, c, _ in located}, reverse=True)
    for d in budgets:
        at = sorted([x for x in located if x[1].tokens == d], key=lambda x: x[1].model_params)
        if len(at) >= 2:
            break
    else:
        return {"possible": False, "reason": "needs two located sizes at one budget"}
    (k1, c1, p1), (k2, c2, p2) = at[-2], at[-1]
    s = accounting.slope
    dn = math.log10(c2.model_params / c1.model_params)

    def slope(x1, x2):
        return ((math.log10(k2) + s * x2) - (math.log10(k1) + s * x1)) / dn

    value = slope(math.log10(p1.collapse_infusion), math.log10(p2.collapse_infusion))
    m = min(p1.boot_log10.size, p2.boot_log10.size)
    reps = slope(p1.boot_log10[:m], p2.boot_log10[:m])
    alpha = (1.0 - confidence) / 2
    lo, hi = (float(v) for v in np.quantile(reps, [alpha, 1.0 - alpha]))
    return {"possible": True, "between": [c1.model_params, c2.model_params], "tokens": d,
            "slope": float(value), "interval": [lo, hi], "still_falling": hi < 0.0}


def support(points: list[CollapsePoint], validation: dict | None, budget_rule: bool) -> dict:
    """The sizes and budgets a prediction is supported for (module docstring)."""
    located = [p for p in points if p.status == COLLAPSE]
    sizes = [p.model_params for p in located]
    n_lo, n_top = min(sizes), max(sizes)
    n_hi, why = EXTRAPOLATION * n_top, f"{EXTRAPOLATION:g}x the largest fitted size"
    if validation and validation.get("measured") is not None:
        if validation["passed"]:
            if validation["model_params"] > n_hi:
                n_hi, why = validation["model_params"], "the validated size"
        else:
            n_hi, why = n_top, "the largest fitted size (the validation failed)"
    elif validation:
        n_hi, why = n_top, "the largest fitted size (the validation measured no collapse point)"
    out = {"n_range": [n_lo, n_hi], "n_reason": why, "budget_rule": budget_rule}
    if budget_rule:
        ratios = [p.tokens / p.model_params for p in located]
        out["tokens_per_parameter"] = [min(ratios), max(ratios)]
    else:
        out["d_range"] = [min(p.tokens for p in located), max(p.tokens for p in located)]
    return out


def supported(sup: dict, n: float, d: float | None) -> tuple[bool, str]:
    """Whether a target lies inside the support, and if not, why."""
    lo, hi = sup["n_range"]
    why = []
    if not lo / _TOL <= n <= hi * _TOL:
        why.append(f"N={n:.3g} lies outside the supported sizes [{lo:.3g}, {hi:.3g}] ({sup['n_reason']})")
    if d is not None:
        if sup["budget_rule"]:
            r_lo, r_hi = sup["tokens_per_parameter"]
            if not r_lo / _TOL <= d / n <= r_hi * _TOL:
                why.append(f"D/N={d / n:.3g} lies outside the ladder's tokens per parameter "
                           f"[{r_lo:.3g}, {r_hi:.3g}]")
        else:
            d_lo, d_hi = sup["d_range"]
            if not d_lo / _TOL <= d <= d_hi * _TOL:
                why.append(f"D={d:.3g} lies outside the ladder's budgets [{d_lo:.3g}, {d_hi:.3g}] "
                           "(no extrapolation in D has been tested)")
    return not why, "; ".join(why)


def support_sentence(sup: dict) -> str:
    lo, hi = sup["n_range"]
    text = f"Predictions are supported for N from {lo:.3g} to {hi:.3g} parameters ({sup['n_reason']})"
    if sup["budget_rule"]:
        r_lo, r_hi = sup["tokens_per_parameter"]
        text += f", trained on {r_lo:.3g}-{r_hi:.3g} tokens per parameter as the ladder was"
    else:
        d_lo, d_hi = sup["d_range"]
        text += (f", at the ladder's budget D={d_lo:.4g}" if d_lo == d_hi
                 else f", for budgets D from {d_lo:.4g} to {d_hi:.4g}")
    return text + "."
