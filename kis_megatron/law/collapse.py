"""Critical collapse point of one retention curve (one model size, one token budget).

Method (the one this project documents and reports):

1. Average the measurements at each infusion level (repeats are seeds) and work in
   x = log10(infusion).
2. Ignore the initial rise: take the level with the highest mean retention, then walk
   back over the levels just before it whose means lie within ``min_drop / 2`` of that
   maximum (they belong to the plateau).  Only data from this plateau start on is used.
3. If the retention never falls by ``min_drop`` below the maximum after it, there is no
   collapse in the measured range: status ``no_collapse_lower_bound``, with the largest
   measured infusion as a lower bound.  If a known chance level is given (``chance``) and
   the maximum is less than ``min_drop`` above it, retention never rose above chance: the
   curve had collapsed already at the smallest infusion, status
   ``collapsed_at_start_upper_bound`` with that infusion as an upper bound.
4. Otherwise fit a smooth step in log-infusion by least squares (scipy.optimize):

       retention(x) = floor + (plateau - floor) * sigmoid(-(x - x0) / width)

   ``floor`` is the chance level when given, else a free parameter kept within 10% of the
   observed drop below the lowest level mean; ``plateau`` may sit at most 10% of the drop
   above the highest level mean, and never above the metric's ``ceiling`` (an accuracy's
   plateau of 1.04 would raise the threshold and lower the point); neither asymptote is
   extrapolated far beyond the data;
   ``width`` (decades) is at least a quarter of the smallest level spacing, so a step
   sharper than the grid is placed midway between the levels that bracket it, as
   log-scale interpolation would.
5. The plateau must be measured: at least two levels before the fall within ``min_drop`` of
   the maximum, or the maximum within ``min_drop`` of a known ceiling (``ceiling``: 1 for an
   accuracy; closer than the smallest fall that counts, it cannot be told from the ceiling).
   And when the other curves of the study reach a higher plateau (``reference_plateau``,
   their median, given by ``law.analysis.locate``; the ladder's for a validation curve), a
   maximum more than ``min_drop`` below it counts only if two levels lie within
   ``min_drop / 2`` of it (flat): two levels on a slow fall, 0.78 and 0.71 where the ladder
   plateaus at 1.0, cannot be told from a plateau by their own noise, but the other curves
   tell.  Otherwise the curve is already falling at its first levels and the threshold, a
   share of the plateau, is unknown: a higher plateau would put the collapse lower, so the
   fitted crossing is only an upper bound (status ``plateau_unobserved_upper_bound``; extend
   the levels down).
6. The collapse point is where retention above the floor has fallen to ``fraction``
   (default 1/2) of the plateau above the floor: x_c = x0 + width * ln((1 - f) / f).  It is
   reported only if some measured level mean lies below that threshold and x_c lies inside
   the fitted range; otherwise the status is the matching bound, never an invented point.
   Without a known floor, a fall seen only at the largest infusion does not measure the
   floor: status ``floor_unobserved_lower_bound``, bounded below by the last level above
   the threshold.
7. Confidence interval: a parametric bootstrap with a fixed seed when the probe count of
   every accuracy is known: each accuracy is redrawn around the fitted step, its run moved by
   the run-to-run spread on the logit scale that the residuals show and then binomial over
   its probes (noise.py; the spread pooled over all curves of an analysis by
   ``law.analysis.locate``, since one curve has only a few residual degrees of freedom), the
   step is refitted and x_c recomputed; the interval is
   the percentile interval of 10**x_c.  So the interval carries the run-to-run spread
   (seeds, other data at other levels) and not only the probes': a curve fitted almost
   exactly by a step (d128 of the tiny ladder: 533 [529, 535] from its residuals) is no
   longer given an interval far narrower than a second seed would move it.  Without probe
   counts, a residual bootstrap: the residuals scaled by sqrt(n / (n - p)) (least-squares
   shrinkage, p fitted parameters) and by t_{n-p} / z, resampled onto the fitted curve (in
   simulations of 9-level curves with even noise, 95% intervals covered 94%; with binomial
   noise about 85%).  The replicates are kept so that the law fit can propagate them (see
   fit.py).  When the fitted width sits at its lower bound (a fall sharper than the level
   spacing), the interval is widened to span the two levels that bracket the threshold, the
   finest placement the grid allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit, ndtri, stdtrit

from kis_megatron.law.noise import SpreadSums, redraw, run_spread
from kis_megatron.law.table import Curve

COLLAPSE = "collapse"
NO_COLLAPSE = "no_collapse_lower_bound"
AT_START = "collapsed_at_start_upper_bound"
FLOOR_UNOBSERVED = "floor_unobserved_lower_bound"
PLATEAU_UNOBSERVED = "plateau_unobserved_upper_bound"

_ASYMPTOTE_MARGIN = 0.1  # plateau/floor may leave the observed range by 10% of the drop


@dataclass
class StepFit:
    """A fitted smooth step in x = log10(infusion); width in decades."""

    plateau: float
    floor: float
    x0: float
    width: float

    def __call__(self, infusion) -> np.ndarray:
        x = np.log10(np.asarray(infusion, dtype=float))
        return step_curve(x, self.plateau, self.floor, self.x0, self.width)

    def crossing(self, fraction: float) -> float:
        """log10 infusion where (retention - floor) = fraction * (plateau - floor)."""
        return self.x0 + self.width * np.log((1.0 - fraction) / fraction)


def step_curve(x, plateau, floor, x0, width) -> np.ndarray:
    """floor + (plateau - floor) * sigmoid(-(x - x0) / width): falls from plateau to floor."""
    return floor + (plateau - floor) * expit(-(np.asarray(x, dtype=float) - x0) / width)


@dataclass
class CollapsePoint:
    """Result for one curve.  ``collapse_infusion`` and ``ci`` are set only when status is
    ``collapse``; the bounds only for the bound statuses."""

    model_params: float
    tokens: float
    status: str
    note: str
    collapse_infusion: float | None = None
    ci: tuple[float, float] | None = None
    lower_bound: float | None = None
    upper_bound: float | None = None
    threshold: float | None = None
    fit: StepFit | None = None
    fit_range: tuple[float, float] | None = None
    n_levels: int = 0
    n_measurements: int = 0
    ceiling: float | None = None  # the metric's largest value the fit was bounded by
    spread: float | None = None  # run-to-run spread (logit) behind the interval (noise.py)
    spread_sums: SpreadSums | None = None  # this curve's residual sums, for pooling
    boot_log10: np.ndarray | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        f = self.fit
        return {
            "model_params": self.model_params,
            "tokens": self.tokens,
            "status": self.status,
            "collapse_infusion": self.collapse_infusion,
            "ci": list(self.ci) if self.ci else None,
            "lower_bound": self.lower_bound,
            "upper_bound": self.upper_bound,
            "threshold": self.threshold,
            "plateau": f.plateau if f else None,
            "floor": f.floor if f else None,
            "width_decades": f.width if f else None,
            "fit_range": list(self.fit_range) if self.fit_range else None,
            "n_levels": self.n_levels,
            "n_measurements": self.n_measurements,
            "note": self.note,
        }


def level_means(infusion: np.ndarray, value: np.ndarray):
    """Distinct infusion levels (sorted), the mean value at each, and the counts."""
    levels, inv, counts = np.unique(infusion, return_inverse=True, return_counts=True)
    means = np.bincount(inv, weights=value) / counts
    return levels, means, counts


def _model_and_jac(theta, x, chance):
    if chance is None:
        plateau, floor, x0, width = theta
    else:
        (plateau, x0, width), floor = theta, chance
    s = expit(-(x - x0) / width)
    ds = (plateau - floor) * s * (1.0 - s)
    cols = [s] + ([1.0 - s] if chance is None else []) + [ds / width, ds * (x - x0) / width**2]
    return floor + (plateau - floor) * s, np.stack(cols, axis=1)


class _StepProblem:
    """Bounds and least-squares refits of the step for one set of infusion levels, so that
    bootstrap replicates reuse the bounds of the original data."""

    def __init__(self, x: np.ndarray, y: np.ndarray, chance: float | None,
                 ceiling: float | None = None):
        self.x, self.chance = x, chance
        levels, means, _ = level_means(x, y)
        drop = max(means.max() - means.min(), 1e-9)
        margin = _ASYMPTOTE_MARGIN * drop
        span = max(levels[-1] - levels[0], 1e-9)
        w_min = np.diff(levels).min() / 4.0 if levels.size > 1 else 0.05
        top = means.max() + margin
        if ceiling is not None:  # an accuracy's plateau cannot lie above 1
            top = max(min(top, ceiling), means.max())
        lo = [min(means.min(), top - 1e-9)]
        hi = [top]
        if chance is None:
            lo.append(means.min() - margin)
            hi.append(means.max())
        lo += [levels[0] - span, w_min]
        hi += [levels[-1] + span, max(span, 2.0 * w_min)]
        self.lo, self.hi = np.array(lo), np.array(hi)
        self.levels, self.means = levels, means
        self.w_start = float(np.clip(np.median(np.diff(levels)) / 2, w_min, hi[-1]))

    def _solve(self, y, start):
        start = np.clip(start, self.lo + 1e-12 * (self.hi - self.lo), self.hi - 1e-12)

        def fun(t):
            return _model_and_jac(t, self.x, self.chance)[0] - y

        def jac(t):
            return _model_and_jac(t, self.x, self.chance)[1]

        return least_squares(fun, start, jac=jac, bounds=(self.lo, self.hi), method="trf")

    def fit(self, y) -> np.ndarray:
        """Best of several starts (x0 at each midpoint between levels)."""
        mids = (self.levels[1:] + self.levels[:-1]) / 2
        if mids.size > 8:
            mids = mids[np.linspace(0, mids.size - 1, 8).round().astype(int)]
        best = None
        for m in mids:
            start = [self.means.max()] + ([self.means.min()] if self.chance is None else [])
            res = self._solve(y, np.array(start + [m, self.w_start]))
            if best is None or res.cost < best.cost:
                best = res
        return best.x

    def refit(self, y, theta) -> np.ndarray:
        return self._solve(y, theta).x

    def to_step(self, theta) -> StepFit:
        if self.chance is None:
            return StepFit(*map(float, theta))
        return StepFit(float(theta[0]), float(self.chance), float(theta[1]), float(theta[2]))


def _residual_inflation(n: int, p: int, alpha: float) -> float:
    """Scale for residuals before resampling: sqrt(n / (n - p)) undoes the shrinkage of
    least-squares residuals, and t_{n-p} / z widens the percentile interval for a noise
    level estimated from only n - p degrees of freedom (as a t interval would)."""
    if n <= p:
        return 1.0
    # stdtrit / ndtri: quantiles of Student's t and the normal (scipy.stats is slow to import)
    return float(np.sqrt(n / (n - p)) * stdtrit(n - p, 1 - alpha) / ndtri(1 - alpha))


def detect_collapse(
    curve: Curve,
    *,
    fraction: float = 0.5,
    chance: float | None = None,
    min_drop: float = 0.1,
    n_boot: int = 1000,
    confidence: float = 0.95,
    rng: np.random.Generator | None = None,
    ceiling: float | None = None,
    spread: float | None = None,
    reference_plateau: float | None = None,
) -> CollapsePoint:
    """Locate the critical collapse point of one retention curve with a bootstrap CI, by the
    method in this module's docstring.  ``fraction``: share of the plateau above the floor
    that defines the collapse; ``chance``: known floor (e.g. 1/(K+1) for K distractors);
    ``min_drop``: smallest fall (metric units) that counts as a collapse; ``ceiling``: the
    largest value the metric can take (1 for an accuracy), a plateau there counts as measured;
    ``spread``: the run-to-run spread for the interval (default: this curve's own, noise.py);
    ``reference_plateau``: the plateau the other curves of the study reach (step 5)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if min_drop <= 0:
        raise ValueError(f"min_drop must be > 0, got {min_drop}")
    rng = rng if rng is not None else np.random.default_rng(0)
    x_all = np.log10(curve.infusion)
    levels, means, _ = level_means(x_all, curve.value)
    raw = np.unique(curve.infusion)  # the same levels, exact, for reporting bounds
    peak = int(np.argmax(means))
    start = peak
    while start > 0 and means[start - 1] >= means[peak] - min_drop / 2:
        start -= 1
    base = dict(model_params=curve.model_params, tokens=curve.tokens, ceiling=ceiling)
    base.update(n_levels=int(levels.size), n_measurements=int(x_all.size))
    lo_inf, hi_inf = float(raw[0]), float(raw[-1])

    if chance is not None and means[peak] - chance < min_drop:
        return CollapsePoint(
            **base, status=AT_START, upper_bound=lo_inf,
            note=f"retention never rose {min_drop:g} above chance {chance:g}: collapsed "
            "at or before the smallest infusion (or never learned)",
        )
    if means[peak] - means[peak:].min() < min_drop:
        return CollapsePoint(
            **base, status=NO_COLLAPSE, lower_bound=hi_inf,
            note=f"retention never fell {min_drop:g} below its maximum in the measured range",
        )

    keep = x_all >= levels[start]
    x, y = x_all[keep], curve.value[keep]
    prob = _StepProblem(x, y, chance, ceiling)
    theta = prob.fit(y)
    fit = prob.to_step(theta)
    threshold = fit.floor + fraction * (fit.plateau - fit.floor)
    xc = fit.crossing(fraction)
    base.update(fit=fit, threshold=float(threshold))
    base["fit_range"] = (float(raw[start]), hi_inf)
    below = np.flatnonzero(means[start:] < threshold) + start
    if below.size == 0 or xc > levels[-1] or fit.plateau <= fit.floor:
        return CollapsePoint(
            **base, status=NO_COLLAPSE, lower_bound=hi_inf,
            note=f"retention did not fall below the threshold {threshold:.3g} within the "
            "measured range",
        )
    if xc < levels[start]:
        return CollapsePoint(
            **base, status=AT_START, upper_bound=float(raw[start]),
            note="the fitted threshold crossing lies before the first fitted level",
        )
    first_below = int(below[0])
    on_plateau = int(np.sum(means[start:first_below] >= means[peak] - min_drop))
    if on_plateau < 2 and not (ceiling is not None and means[peak] >= ceiling - min_drop):
        return CollapsePoint(
            **base, status=PLATEAU_UNOBSERVED, upper_bound=float(10**xc),
            note=f"the plateau is not measured (one level, {raw[peak]:.4g}, above the fall, at "
            f"{means[peak]:.3g}): a higher plateau puts the collapse lower; add levels below",
        )
    flat = int(np.sum(means[start:first_below] >= means[peak] - min_drop / 2))
    if reference_plateau is not None and means[peak] < reference_plateau - min_drop and flat < 2:
        return CollapsePoint(
            **base, status=PLATEAU_UNOBSERVED, upper_bound=float(10**xc),
            note=f"the highest level mean, {means[peak]:.3g} at {raw[peak]:.4g}, lies more than "
            f"{min_drop:g} below the other curves' plateaus ({reference_plateau:.3g}) and the levels "
            "before the fall are not flat: the curve is already falling; add levels below",
        )
    last_above = max(first_below - 1, start)
    if chance is None and first_below == levels.size - 1:
        # Without a known floor, one fallen level does not measure the floor, so the
        # threshold is unknown; the collapse lies beyond the last level above it.
        return CollapsePoint(
            **base, status=FLOOR_UNOBSERVED, lower_bound=float(raw[last_above]),
            note="retention falls only at the largest infusion and the floor is not "
            "measured: give --chance or extend the infusion range",
        )

    fitted = prob.to_step(theta)(10**x)
    n, p = y.size, theta.size
    alpha = (1.0 - confidence) / 2
    boot = np.empty(n_boot)
    k = curve.n_probes[keep] if curve.n_probes is not None else None
    if k is not None:
        base["spread_sums"] = SpreadSums.of(y, fitted, k, p)
    if n_boot == 0:  # the fit alone (locate's first pass, for the pooled spread)
        return CollapsePoint(**base, status=COLLAPSE, collapse_infusion=float(10**xc),
                             note="located; no interval (n_boot=0)")
    if k is not None:
        # every accuracy redrawn over its probes with the run-to-run spread (noise.py):
        # the analysis's pooled run-to-run spread, else this curve's own
        if spread is None:
            spread = run_spread(base["spread_sums"])
        base["spread"] = spread
        for r in range(n_boot):
            boot[r] = prob.to_step(prob.refit(redraw(rng, fitted, k, spread), theta)).crossing(fraction)
    else:
        resid = (y - fitted) * _residual_inflation(n, p, alpha)
        for r in range(n_boot):
            y_star = fitted + rng.choice(resid, size=n, replace=True)
            boot[r] = prob.to_step(prob.refit(y_star, theta)).crossing(fraction)
    ci_lo, ci_hi = np.quantile(boot, [alpha, 1.0 - alpha])
    note = "collapse located inside the measured range"
    if fit.width <= prob.lo[-1] * (1 + 1e-9):
        # The fall is sharper than the level spacing: the data place it only between the
        # two levels that bracket the threshold.
        ci_lo, ci_hi = min(ci_lo, levels[last_above]), max(ci_hi, levels[first_below])
        note += "; the fall is sharper than the level spacing, so the CI spans the bracketing levels"
    if n <= p:
        note += f"; only {n} measurements for {p} parameters: the CI is too narrow"
    return CollapsePoint(
        **base, status=COLLAPSE, collapse_infusion=float(10**xc),
        ci=(float(10**ci_lo), float(10**ci_hi)), boot_log10=boot, note=note,
    )
