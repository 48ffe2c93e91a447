"""The joint fit: every retention curve at once, with each curve's collapse point tied to the
law.

The two-stage fit (fit.py) reduces each curve to one collapse point and then draws a line
through a handful of points; what the curves say about the fall beyond that point is lost.
Here one least-squares problem holds all curves (one per model size and token budget):

    retention_ij = floor_i + (plateau_i - floor_i) * sigmoid(-(x_ij - x0_i) / width_i)
    x0_i = xc_i - width_i * ln((1 - f) / f)           (the fraction-f crossing is xc_i)
    xc_i = log10 a + b log10 N_i (+ c log10 D_i)       (the law)

with x = log10(infusion).  Each curve keeps its own plateau, width (and floor, unless the
chance level is known); the collapse points are no longer free, so every curve informs a
and b through its whole fall.  The curves and their data are those the per-curve detector
(collapse.py) located, from each curve's plateau start on; bounds stay out, as in the
two-stage fit.

Intervals: a bootstrap over the measurements, refitting the whole problem per replicate.
When the table says how many probes each accuracy was scored on (``n_probes``, which
tools/extract_metrics.py writes), every run is redrawn from its fitted accuracy: binomial
over its probes, widened to a beta-binomial by the overdispersion phi = max(1, Pearson
chi^2 / residual degrees of freedom), which absorbs run-to-run (seed) noise beyond the
probes' own.  Otherwise, with repeated runs at a level (seeds), whole runs are resampled
within their level (deviations from the level mean scaled by sqrt(k / (k - 1)) for k
repeats); without either, a wild bootstrap (residual times a random sign, scaled by
1 / sqrt(1 - leverage)).  The simulations in benchmarks/bench_law_methods.py measured bias,
coverage and prediction error of the fits and resamplers; benchmarks/RESULTS.md records them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares
from scipy.special import expit

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint, _StepProblem
from kis_megatron.law.fit import LawFit, design_matrix, law_design
from kis_megatron.law.table import Curve


@dataclass
class _CurveBlock:
    """One curve's data and parameter slots in the joint problem."""

    x: np.ndarray  # log10 infusion of the fitted measurements
    y: np.ndarray
    row: np.ndarray  # [1, log10 N (, log10 D)]
    lo: np.ndarray  # bounds of (plateau, [floor,] width)
    hi: np.ndarray
    start: np.ndarray  # start values of (plateau, [floor,] width)
    level_of: np.ndarray  # index of each measurement's level (for the run bootstrap)
    n_probes: np.ndarray | None  # probes behind each accuracy, when known


class JointProblem:
    """The stacked least-squares problem; parameters are [law coefficients, then per curve
    (plateau, [floor,] width)]."""

    def __init__(self, curves: list[Curve], points: list[CollapsePoint], chance: float | None,
                 fraction: float, use_tokens: bool):
        self.chance, self.use_tokens = chance, use_tokens
        self.shift = math.log((1.0 - fraction) / fraction)
        self.k = 3 if use_tokens else 2
        self.per = 2 if chance is not None else 3
        self.blocks = []
        for c, p in zip(curves, points):
            keep = c.infusion >= p.fit_range[0] * (1 - 1e-12)
            x, y = np.log10(c.infusion[keep]), c.value[keep]
            prob = _StepProblem(x, y, chance)  # the detector's bounds for this curve
            f = p.fit
            # bounds/starts of (plateau, [floor,] width); x0's bounds are replaced by the law
            lo = np.delete(prob.lo, -2)
            hi = np.delete(prob.hi, -2)
            start = [f.plateau] + ([f.floor] if chance is None else []) + [f.width]
            start = np.clip(start, lo + 1e-9 * (hi - lo), hi - 1e-9 * (hi - lo))
            row = design_matrix(c.model_params, c.tokens, use_tokens)[0]
            _, level_of = np.unique(x, return_inverse=True)
            k = c.n_probes[keep] if c.n_probes is not None else None
            self.blocks.append(_CurveBlock(x, y, row, lo, hi, start, level_of, k))
        self.y = np.concatenate([b.y for b in self.blocks])
        inf = np.full(self.k, np.inf)
        self.lo = np.concatenate([-inf] + [b.lo for b in self.blocks])
        self.hi = np.concatenate([inf] + [b.hi for b in self.blocks])

    def _curve_params(self, theta, i):
        s = self.k + i * self.per
        q = theta[s:s + self.per]
        plateau, width = q[0], q[-1]
        floor = q[1] if self.chance is None else self.chance
        return plateau, floor, width

    def model(self, theta, jac: bool = False):
        coef = theta[:self.k]
        preds, rows = [], []
        for i, b in enumerate(self.blocks):
            plateau, floor, width = self._curve_params(theta, i)
            xc = b.row @ coef
            x0 = xc - width * self.shift
            s = expit(-(b.x - x0) / width)
            preds.append(floor + (plateau - floor) * s)
            if jac:
                ds = (plateau - floor) * s * (1.0 - s)
                j = np.zeros((b.x.size, theta.size))
                j[:, :self.k] = (ds / width)[:, None] * b.row[None, :]
                c0 = self.k + i * self.per
                j[:, c0] = s
                if self.chance is None:
                    j[:, c0 + 1] = 1.0 - s
                j[:, c0 + self.per - 1] = ds * ((b.x - x0) / width**2 - self.shift / width)
                rows.append(j)
        pred = np.concatenate(preds)
        return (pred, np.concatenate(rows)) if jac else pred

    def start(self, coef0: np.ndarray) -> np.ndarray:
        theta = np.concatenate([coef0] + [b.start for b in self.blocks])
        return np.clip(theta, self.lo, self.hi)

    def solve(self, y: np.ndarray, theta0: np.ndarray) -> np.ndarray:
        res = least_squares(lambda t: self.model(t) - y, theta0,
                            jac=lambda t: self.model(t, jac=True)[1],
                            bounds=(self.lo, self.hi), method="trf")
        return res.x


def _leverage(jac: np.ndarray) -> np.ndarray:
    """Diagonal of the hat matrix J (J^T J)^+ J^T at the solution."""
    q, _ = np.linalg.qr(jac)
    return np.clip(np.sum(q**2, axis=1), 0.0, 0.99)


def fit_law_joint(curves: list[Curve], points: list[CollapsePoint], *, chance: float | None,
                  fraction: float = 0.5, n_boot: int = 1000, confidence: float = 0.95,
                  rng: np.random.Generator | None = None, terms: str = "auto") -> LawFit:
    """Fit the law to all located curves at once (module docstring); returns a LawFit whose
    coefficients and bootstrap replicates come from the joint problem."""
    rng = rng if rng is not None else np.random.default_rng(0)
    used = [(c, p) for c, p in zip(curves, points) if p.status == COLLAPSE]
    cs, ps = [c for c, _ in used], [p for _, p in used]
    x, use_tokens, note = law_design(points, terms)
    yc = np.log10([p.collapse_infusion for p in ps])
    coef0, *_ = np.linalg.lstsq(x, yc, rcond=None)  # the two-stage line as the start
    prob = JointProblem(cs, ps, chance, fraction, use_tokens)
    theta = prob.solve(prob.y, prob.start(coef0))
    fitted, jac = prob.model(theta, jac=True)
    resid = prob.y - fitted

    boot = np.empty((n_boot, prob.k))
    repeats = any(np.bincount(b.level_of).max() > 1 for b in prob.blocks)
    if all(b.n_probes is not None for b in prob.blocks):
        y_star_fn = _binomial_resampler(prob, fitted, theta.size, rng)
    elif repeats:
        y_star_fn = _run_resampler(prob, rng)
    else:
        scaled = resid / np.sqrt(1.0 - _leverage(jac))

        def y_star_fn():
            return fitted + scaled * rng.choice((-1.0, 1.0), size=scaled.size)

    for r in range(n_boot):
        boot[r] = prob.solve(y_star_fn(), theta)[:prob.k]
    coef = theta[:prob.k]
    return LawFit(
        coef=coef, boot_coef=boot, use_tokens=use_tokens, confidence=confidence, points=ps,
        rms_log10_residual=float(np.sqrt(np.mean((yc - x @ coef) ** 2))),
        dropped_replicates=0, method="joint", note=note,
    )


def _run_resampler(prob: JointProblem, rng: np.random.Generator):
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

    def draw():
        out = []
        for base, dev, members in parts:
            d = np.empty_like(dev)
            for m in members:
                d[m] = dev[m][rng.integers(0, m.size, size=m.size)]
            out.append(base + d)
        return np.concatenate(out)

    return draw


def _binomial_resampler(prob: JointProblem, fitted: np.ndarray, n_params: int,
                        rng: np.random.Generator):
    """Redraw every accuracy from its fitted value over its probes: binomial, or
    beta-binomial with the overdispersion the residuals show (module docstring)."""
    k = np.concatenate([b.n_probes for b in prob.blocks])
    p = np.clip(fitted, 0.5 / k, 1.0 - 0.5 / k)
    pearson = (prob.y - p) ** 2 / (p * (1.0 - p) / k)
    dof = max(prob.y.size - n_params, 1)
    phi = max(1.0, float(pearson.sum() / dof))
    rho = np.where(k > 1, np.clip((phi - 1.0) / np.maximum(k - 1.0, 1.0), 0.0, 0.999), 0.0)
    k_int = np.round(k).astype(np.int64)

    def draw():
        q = p
        if phi > 1.0:
            m = 1.0 / np.maximum(rho, 1e-12) - 1.0
            q = np.where(rho > 0, rng.beta(np.maximum(p * m, 1e-9), np.maximum((1 - p) * m, 1e-9)), p)
        return rng.binomial(k_int, q) / k

    draw.phi = phi
    return draw
