"""Exposure accounting: how many renderings of the infused set a run's budget held, and what a
target model's budget will hold.

For the facts knob (``domain_facts``: F facts at a fixed domain share), the blender counts
every time a fact's rendered statement lies whole inside a training window; a run's mean
exposures per fact times F is R, the renderings its budget held (12,090-12,247 over 32 to
2048 facts in the tiny ladder: constant within 1.3%, as it should be).  The curve's
exposure scale K is the geometric mean of R over its runs, so that E = K / F at every level.

A target model trains on D tokens at a domain share s (default: the ladder's), so its
renderings are R = s * D / t, with t the tokens one rendering takes, measured on the ladder
as domain tokens over renderings (it includes the statements cut by window edges, so it
holds for targets with the ladder's sequence length and data; a longer sequence cuts fewer).
Without a logged domain-token count, t is unknown and the target keeps the ladder's share:
R scales with D from the ladder's budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kis_megatron.law.forms import FACTS_KINDS
from kis_megatron.law.table import Curve, LawInputError


@dataclass
class ExposureAccounting:
    """The exposure scales of the ladder's curves and the rule for a target's."""

    slope: float  # E = K * infusion^slope (-1: a number of facts)
    scales: list[float]  # K (= R) of every curve, in the order of the curves
    spread: float  # largest relative deviation of a run's R from its curve's K
    tokens_per_rendering: float | None  # t, when domain tokens were logged
    share: float | None  # the ladder's domain share of training tokens (median over runs)
    budgets: list[float]  # the ladder's token budgets
    budget_scales: list[float]  # K at each budget (median over its curves)

    def scale_for(self, d: float, share: float | None = None) -> float:
        """R of a target trained on ``d`` tokens at domain ``share`` (module docstring)."""
        if share is not None and not 0.0 < share <= 1.0:
            raise LawInputError(f"the domain share must be in (0, 1], got {share:g}")
        if self.tokens_per_rendering is not None:
            s = self.share if share is None else share
            return float(s * d / self.tokens_per_rendering)
        if share is not None and self.share is None:
            raise LawInputError("the table has no domain_tokens column, so the tokens a rendering "
                                "takes are unknown: give the target at the ladder's share")
        i = int(np.argmin(np.abs(np.log(np.asarray(self.budgets) / d))))
        return float(self.budget_scales[i] * d / self.budgets[i])

    def to_json(self) -> dict:
        return {
            "exposure_slope": self.slope,
            "renderings_per_curve": self.scales,
            "renderings_spread": self.spread,
            "tokens_per_rendering": self.tokens_per_rendering,
            "domain_share": self.share,
            "budgets": self.budgets,
            "renderings_per_budget": self.budget_scales,
        }


def exposure_accounting(curves: list[Curve], kind: str) -> tuple[ExposureAccounting | None, str]:
    """The accounting of ``curves`` for infusion ``kind``, or None and the reason the
    exposure forms cannot be fitted."""
    if kind not in FACTS_KINDS:
        return None, (f"the exposure forms need the facts knob ({', '.join(FACTS_KINDS)}); "
                      f"this study varies {kind!r}")
    if any(c.exposures is None for c in curves):
        missing = ", ".join(c.label for c in curves if c.exposures is None)
        return None, f"the exposure forms need the exposures per fact of every run; none logged for {missing}"
    slope = -1.0
    scales, spread, t_all, shares = [], 0.0, [], []
    for c in curves:
        r = c.exposures * c.infusion  # renderings of each run
        k = float(np.exp(np.mean(np.log(r))))
        scales.append(k)
        spread = max(spread, float(np.max(np.abs(r / k - 1.0))))
        if c.domain_tokens is not None:
            t_all.extend(c.domain_tokens / r)
            shares.extend(c.domain_tokens / c.tokens)
    logged = all(c.domain_tokens is not None for c in curves)
    budgets = sorted({c.tokens for c in curves})
    per_budget = [float(np.median([k for k, c in zip(scales, curves) if c.tokens == d])) for d in budgets]
    return ExposureAccounting(
        slope=slope, scales=scales, spread=spread,
        tokens_per_rendering=float(np.median(t_all)) if logged else None,
        share=float(np.median(shares)) if logged else None,
        budgets=budgets, budget_scales=per_budget,
    ), ""
