"""The joint fit: every retention curve at once, with each curve's collapse point tied to the
law.

The two-stage fit (fit.py) reduces each curve to one collapse point and then draws a line
through a handful of points; what the curves say about the fall beyond that point is lost.
Here one least-squares problem holds all curves (one per model size and token budget):

    retention_ij = floor_i + (plateau_i - floor_i) * sigmoid(-(x_ij - x0_i) / width_i)
    x0_i = xc_i - width_i * ln((1 - f) / f)           (the fraction-f crossing is xc_i)
    xc_i = form(theta; N_i, D_i, K_i)                  (the law, one of forms.py)

with x = log10(infusion); the paper's power form is xc_i = log10 a + b log10 N_i
(+ c log10 D_i), the exposure forms xc_i = log10 K_i - log10 E*(N_i, D_i) (K_i: the
curve's renderings, forms.py).
with x = log10(infusion).  Each curve keeps its own plateau, width (and floor, unless the
chance level is known); the collapse points are no longer free, so every curve informs a
and b through its whole fall.  The curves and their data are those the per-curve detector
(collapse.py) located, from each curve's plateau start on; bounds stay out, as in the
two-stage fit.

Intervals: a bootstrap over the measurements, refitting the whole problem per replicate.
When the table says how many probes each accuracy was scored on (``n_probes``, which
tools/extract_metrics.py writes), every run is redrawn from its fitted accuracy: moved by
the run-to-run spread on the logit scale that the residuals show, then binomial over its
probes (noise.py), which carries the seed noise beyond the probes' own.  (Until 2026-12-03 a
beta-binomial with one overdispersion factor; it spreads the noise evenly over plateau and
fall, where the fall carries most.)  Otherwise, with repeated runs at a level (seeds), whole
runs are resampled within their level (deviations from the level mean scaled by
sqrt(k / (k - 1)) for k repeats); without either, a wild bootstrap (residual times a random
sign, scaled by 1 / sqrt(1 - leverage)).  Every replicate also moves each curve's collapse
point by its own draw from the scatter of the curves about the law (``curve_scatter``): a
seed shifts a whole curve, which no curve's residuals show.  The simulations in benchmarks/bench_law_methods.py measured bias,
coverage and prediction error of the fits and resamplers; benchmarks/RESULTS.md records them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint, _StepProblem
from kis_megatron.law.fit import LawFit, law_design
from kis_megatron.law.forms import FORMS, Covariates, Form
from kis_megatron.law.noise import SpreadSums, redraw, run_spread
from kis_megatron.law.table import Curve, LawInputError


@dataclass
class _CurveBlock:
    """One curve's data and parameter slots in the joint problem."""

    x: np.ndarray  # log10 infusion of the fitted measurements
    y: np.ndarray
    lo: np.ndarray  # bounds of (plateau, [floor,] width)
    hi: np.ndarray
    start: np.ndarray  # start values of (plateau, [floor,] width)
    level_of: np.ndarray  # index of each measurement's level (for the run bootstrap)
    n_probes: np.ndarray | None  # probes behind each accuracy, when known


class JointProblem:
    """The stacked least-squares problem; parameters are [the form's law parameters, then per
    curve (plateau, [floor,] width)]."""

    def __init__(self, curves: list[Curve], points: list[CollapsePoint], chance: float | None,
                 fraction: float, form: Form, cov: Covariates):
        self.chance, self.form, self.cov = chance, form, cov
        self.shift = math.log((1.0 - fraction) / fraction)
        self.k = form.k
        self.per = 2 if chance is not None else 3
        self.blocks = []
        for c, p in zip(curves, points):
            keep = c.infusion >= p.fit_range[0] * (1 - 1e-12)
            x, y = np.log10(c.infusion[keep]), c.value[keep]
            prob = _StepProblem(x, y, chance, p.ceiling)  # the detector's bounds for this curve
            f = p.fit
            # bounds/starts of (plateau, [floor,] width); x0's bounds are replaced by the law
            lo = np.delete(prob.lo, -2)
            hi = np.delete(prob.hi, -2)
            start = [f.plateau] + ([f.floor] if chance is None else []) + [f.width]
            start = np.clip(start, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
            _, level_of = np.unique(x, return_inverse=True)
            k = c.n_probes[keep] if c.n_probes is not None else None
            self.blocks.append(_CurveBlock(x, y, lo, hi, start, level_of, k))
        self.y = np.concatenate([b.y for b in self.blocks])
        law_lo, law_hi = form.bounds()
        self.lo = np.concatenate([law_lo] + [b.lo for b in self.blocks])
        self.hi = np.concatenate([law_hi] + [b.hi for b in self.blocks])

    @property
    def n_params(self) -> int:
        return self.lo.size

    def _slots(self):
        """Index arrays of the stacked measurements: their curve, and the parameter columns
        of that curve's plateau, floor (or None) and width (built once)."""
        if not hasattr(self, "_idx"):
            self._idx = np.concatenate([np.full(b.x.size, i) for i, b in enumerate(self.blocks)])
            self._x = np.concatenate([b.x for b in self.blocks])
            base = self.k + self._idx * self.per
            self._cols = (base, base + 1 if self.chance is None else None, base + self.per - 1)
        return self._idx, self._x, self._cols

    def _per_curve(self, theta, j) -> np.ndarray:
        return np.asarray(theta[self.k + j::self.per][:len(self.blocks)])

    def widths(self, theta) -> np.ndarray:
        return self._per_curve(theta, self.per - 1)

    def plateaus(self, theta) -> np.ndarray:
        return self._per_curve(theta, 0)

    def floors(self, theta) -> np.ndarray:
        if self.chance is not None:
            return np.full(len(self.blocks), self.chance)
        return self._per_curve(theta, 1)

    def model(self, theta, jac: bool = False, shift: np.ndarray | None = None):
        """The fitted accuracies (and the Jacobian); ``shift`` moves each curve's collapse
        point by that many decades (a curve's own seed effect, for the bootstrap)."""
        idx, x, (c_plat, c_floor, c_width) = self._slots()
        xcs, grads = self.form.xc(theta[:self.k], self.cov, grad=True)
        if shift is not None:
            xcs = xcs + shift
        plateau, width = theta[c_plat], theta[c_width]
        floor = theta[c_floor] if c_floor is not None else self.chance
        x0 = xcs[idx] - width * self.shift
        s = expit(-(x - x0) / width)
        pred = floor + (plateau - floor) * s
        if not jac:
            return pred
        n = x.size
        rows = np.arange(n)
        ds = (plateau - floor) * s * (1.0 - s)
        j = np.zeros((n, theta.size))
        j[:, :self.k] = (ds / width)[:, None] * grads[idx]
        j[rows, c_plat] = s
        if c_floor is not None:
            j[rows, c_floor] = 1.0 - s
        j[rows, c_width] = ds * ((x - x0) / width**2 - self.shift / width)
        return pred, j

    def start(self, coef0: np.ndarray) -> np.ndarray:
        theta = np.concatenate([coef0] + [b.start for b in self.blocks])
        span = self.hi - self.lo
        pad = np.where(np.isfinite(span), 1e-9 * span, 0.0)
        return np.clip(theta, self.lo + pad, self.hi - pad)

    def solve(self, y: np.ndarray, theta0: np.ndarray, tol: float = 1e-8):
        """The least-squares solution from ``theta0`` (scipy's result); bootstrap refits
        use ``tol`` 1e-6 (twice as fast, the same replicates to 1e-3 of their spread)."""
        return least_squares(lambda t: self.model(t) - y, theta0,
                             jac=lambda t: self.model(t, jac=True)[1],
                             bounds=(self.lo, self.hi), method="trf", ftol=tol, xtol=tol, gtol=tol)

    def best_solution(self, starts: list[np.ndarray]):
        """The lowest-cost solution over several law starts (the curves start from their
        own step fits)."""
        best = None
        for coef0 in starts:
            res = self.solve(self.y, self.start(np.asarray(coef0, dtype=float)))
            if best is None or res.cost < best.cost:
                best = res
        return best


def _leverage(jac: np.ndarray) -> np.ndarray:
    """Diagonal of the hat matrix J (J^T J)^+ J^T at the solution."""
    q, _ = np.linalg.qr(jac)
    return np.clip(np.sum(q**2, axis=1), 0.0, 0.99)


def curve_scatter(xc_curves: np.ndarray, xc_law: np.ndarray, points: list[CollapsePoint],
                  k: int) -> float:
    """The spread (decades) of the curves' own collapse points about the law beyond their own
    intervals: tau^2 = sum(r^2) / (curves - k) - mean(se^2), at least 0 (a random-effects
    meta-regression's moment estimate).  It holds what no curve shows by itself: a seed moves
    a whole curve (d192: 511 against about 650 for two seeds), and a form that misses the
    bend leaves its residuals here.  0 with no spare curve."""
    dof = len(points) - k
    if dof < 1:
        return 0.0
    se = np.array([np.log10(p.ci[1] / p.ci[0]) / (2 * 1.96) for p in points])
    resid = np.asarray(xc_curves) - np.asarray(xc_law)
    return float(np.sqrt(max(0.0, float(resid @ resid) / dof - float(np.mean(se**2)))))


def ladder_covariates(curves: list[Curve], scales: list[float] | None, slope: float) -> Covariates:
    """The form inputs of fitted curves (``scales``: their exposure scales K, or None)."""
    return Covariates.of([c.model_params for c in curves], [c.tokens for c in curves],
                         scales, slope)


def fit_curves(curves: list[Curve], points: list[CollapsePoint], *, chance: float | None,
                  fraction: float = 0.5, n_boot: int = 1000, confidence: float = 0.95,
                  rng: np.random.Generator | None = None, terms: str = "auto",
                  form: str = "power", scales: list[float] | None = None,
                  slope: float = -1.0) -> LawFit:
    """Fit the law in ``form`` (forms.py) to all located curves at once (module docstring);
    returns a LawFit whose parameters and bootstrap replicates come from the joint problem.
    ``scales``: the exposure scale K of each of ``curves`` (needed by the exposure forms),
    ``slope``: the exposure slope s of the knob."""
    rng = rng if rng is not None else np.random.default_rng(0)
    used = [i for i, p in enumerate(points) if p.status == COLLAPSE]
    cs, ps = [curves[i] for i in used], [points[i] for i in used]
    x, use_tokens, note = law_design(points, terms)
    ks = None
    if FORMS[form].uses_exposures:
        if scales is None or any(scales[i] is None for i in used):
            raise LawInputError(f"the {form} form needs the exposures per fact of every run "
                                "(the `exposures` column) and a facts knob")
        ks = [scales[i] for i in used]
    cov = ladder_covariates(cs, ks, slope)
    law_form = FORMS[form](cov, use_tokens)
    if len({c.model_params for c in cs}) < law_form.k_n:
        raise LawInputError(f"the {form} form has {law_form.k_n} parameters in N: it needs "
                            f"located collapse points at {law_form.k_n} model sizes or more")
    yc = np.log10([p.collapse_infusion for p in ps])
    prob = JointProblem(cs, ps, chance, fraction, law_form, cov)
    res = prob.best_solution(law_form.starts(cov, yc))
    theta = res.x
    fitted, jac = prob.model(theta, jac=True)
    resid = prob.y - fitted

    tau = curve_scatter(yc, law_form.xc(theta[:prob.k], cov), ps, law_form.k)
    boot = np.empty((n_boot, prob.k))
    repeats = any(np.bincount(b.level_of).max() > 1 for b in prob.blocks)
    if all(b.n_probes is not None for b in prob.blocks):
        y_star_fn = _binomial_resampler(prob, fitted, theta.size, rng)
    elif repeats:
        y_star_fn = _run_resampler(prob, fitted, rng)
    else:
        scaled = resid / np.sqrt(1.0 - _leverage(jac))

        def y_star_fn(base):
            return base + scaled * rng.choice((-1.0, 1.0), size=scaled.size)

    widths, plateaus, floors = (np.empty((n_boot, len(cs))) for _ in range(3))
    for r in range(n_boot):
        base = prob.model(theta, shift=rng.normal(0.0, tau, len(cs))) if tau > 0 else fitted
        t = prob.solve(y_star_fn(base), theta, tol=1e-6).x
        boot[r], widths[r], plateaus[r], floors[r] = t[:prob.k], prob.widths(t), prob.plateaus(t), prob.floors(t)
    coef = theta[:prob.k]
    law = LawFit(
        coef=coef, boot_coef=boot, use_tokens=use_tokens, confidence=confidence, points=ps,
        rms_log10_residual=float(np.sqrt(np.mean((yc - law_form.xc(coef, cov)) ** 2))),
        dropped_replicates=0, method="joint", note=note, form=law_form, exposure_slope=slope,
        rss=float(resid @ resid), n_obs=int(resid.size), n_params=int(theta.size),
        curve_sd=tau,
    )
    law.curve_shapes = CurveShapes(cs, prob.widths(theta), prob.plateaus(theta), prob.floors(theta),
                                   widths, plateaus, floors)
    return law


@dataclass
class CurveShapes:
    """The fitted curves' widths (decades) and plateaus, with their bootstrap replicates
    (the recommendation reads how far below the collapse point retention is still high)."""

    curves: list[Curve]
    width: np.ndarray  # (n_curves,)
    plateau: np.ndarray
    floor: np.ndarray
    boot_width: np.ndarray  # (R, n_curves)
    boot_plateau: np.ndarray
    boot_floor: np.ndarray


def _run_resampler(prob: JointProblem, fitted: np.ndarray, rng: np.random.Generator):
    """Resample whole runs within each level: level mean + a resampled, inflated deviation
    (levels measured once keep their value)."""
    parts = []
    for b in prob.blocks:
        counts = np.bincount(b.level_of)
        means = np.bincount(b.level_of, weights=b.y) / counts
        dev = b.y - means[b.level_of]
        k = counts[b.level_of]
        dev = dev * np.where(k > 1, np.sqrt(k / np.maximum(k - 1, 1)), 0.0)
        members = [np.flatnonzero(b.level_of == j) for j in range(counts.size)]
        parts.append((means[b.level_of], dev, members))

    def draw(shifted):
        out = []
        for base, dev, members in parts:
            d = np.empty_like(dev)
            for m in members:
                d[m] = dev[m][rng.integers(0, m.size, size=m.size)]
            out.append(base + d)
        return np.concatenate(out) + (shifted - fitted)

    return draw


def _binomial_resampler(prob: JointProblem, fitted: np.ndarray, n_params: int,
                        rng: np.random.Generator):
    """Redraw every accuracy from its fitted value over its probes: binomial, or
    its run moved by the run-to-run spread the residuals show (module docstring, noise.py)."""
    k = np.concatenate([b.n_probes for b in prob.blocks])
    spread = run_spread(SpreadSums.of(prob.y, fitted, k, n_params))

    def draw(base):
        return redraw(rng, base, k, spread)

    draw.spread = spread
    return draw
