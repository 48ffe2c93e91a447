"""The knowledge infusion scaling law: collapse point CP as a power law of model size N
(and of token budget D when the collapse points span several budgets),

    CP = a * N^b            or            CP = a * N^b * D^c,

fitted by least squares in log10 space.

Uncertainty comes from one bootstrap of the whole pipeline: replicate r takes, for every
collapse point, its r-th bootstrap replicate (collapse.py resamples each retention curve
independently and re-locates its collapse), and refits the law.  The percentile intervals
of a, b, c and of any prediction therefore carry the measurement noise of the retention
curves.  They do not carry misfit of the power-law form itself: that is what the
leave-the-largest-model-out check tests, and the report gives the RMS residual of the law.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint
from kis_megatron.law.table import LawInputError


def _design(n, d, use_tokens: bool) -> np.ndarray:
    """Rows [1, log10 N (, log10 D)]."""
    n = np.atleast_1d(np.asarray(n, dtype=float))
    cols = [np.ones_like(n), np.log10(n)]
    if use_tokens:
        cols.append(np.log10(np.broadcast_to(np.asarray(d, dtype=float), n.shape)))
    return np.stack(cols, axis=1)


@dataclass
class LawFit:
    """A fitted law: ``coef`` = [log10 a, b (, c)] and its bootstrap replicates."""

    coef: np.ndarray  # (p,)
    boot_coef: np.ndarray  # (R, p)
    use_tokens: bool
    confidence: float
    points: list[CollapsePoint]
    rms_log10_residual: float
    dropped_replicates: int

    @property
    def coefficient(self) -> float:
        return float(10 ** self.coef[0])

    @property
    def exponent(self) -> float:
        return float(self.coef[1])

    @property
    def tokens_exponent(self) -> float | None:
        return float(self.coef[2]) if self.use_tokens else None

    def _interval(self, samples: np.ndarray) -> tuple[float, float]:
        alpha = (1.0 - self.confidence) / 2
        lo, hi = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
        return float(lo), float(hi)

    def coef_ci(self, k: int) -> tuple[float, float]:
        """Percentile interval of coefficient k (0: log10 a, 1: b, 2: c)."""
        return self._interval(self.boot_coef[:, k])

    def coefficient_ci(self) -> tuple[float, float]:
        lo, hi = self.coef_ci(0)
        return 10**lo, 10**hi

    def predict(self, n, d=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted collapse infusion at sizes ``n`` (and budgets ``d``) with the lower and
        upper ends of its bootstrap interval; arrays of n's shape."""
        if self.use_tokens and d is None:
            raise LawInputError(
                "the law depends on the token budget D: give the target as N,D "
                "(for example --predict 1e9,2e10)"
            )
        x = _design(n, d, self.use_tokens)
        pred = x @ self.coef
        samples = self.boot_coef @ x.T  # (R, len(n))
        alpha = (1.0 - self.confidence) / 2
        lo, hi = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
        return 10**pred, 10**lo, 10**hi

    def form(self) -> str:
        return "CP = a * N^b * D^c" if self.use_tokens else "CP = a * N^b"


def usable_points(points: list[CollapsePoint]) -> list[CollapsePoint]:
    """Collapse points that were located (the bounds are excluded from the fit)."""
    return [p for p in points if p.status == COLLAPSE]


def fit_law(points: list[CollapsePoint], confidence: float = 0.95) -> LawFit:
    """Fit CP = a N^b (D^c when the located points span several token budgets) to the
    located collapse points, with pipeline-bootstrap replicates (see module docstring).
    Raises LawInputError when fewer than two model sizes have a located collapse, or when
    budgets vary but cannot be separated from sizes."""
    used = usable_points(points)
    sizes = sorted({p.model_params for p in used})
    if len(sizes) < 2:
        summary = "; ".join(f"N={p.model_params:.4g} D={p.tokens:.4g}: {p.status}" for p in points)
        raise LawInputError(
            f"no law can be fitted: {len(sizes)} model size(s) have a located collapse point "
            f"and at least 2 are needed ({summary}); widen the infusion range so that "
            "retention falls within it"
        )
    n = np.array([p.model_params for p in used])
    d = np.array([p.tokens for p in used])
    use_tokens = np.unique(d).size > 1
    x = _design(n, d, use_tokens)
    if np.linalg.matrix_rank(x) < x.shape[1]:
        raise LawInputError(
            "the located collapse points change model size and token budget together, so "
            "their effects cannot be separated; add runs of one size at several budgets"
        )
    y = np.log10([p.collapse_infusion for p in used])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    boot = np.stack([p.boot_log10 for p in used])  # (n_points, R)
    ok = np.all(np.isfinite(boot), axis=0)
    boot_coef, *_ = np.linalg.lstsq(x, boot[:, ok], rcond=None)
    return LawFit(
        coef=coef,
        boot_coef=boot_coef.T,
        use_tokens=use_tokens,
        confidence=confidence,
        points=used,
        rms_log10_residual=float(np.sqrt(np.mean(resid**2))),
        dropped_replicates=int((~ok).sum()),
    )


def leave_largest_out(full: LawFit) -> dict:
    """Refit ``full`` without its largest model size and predict that size's collapse
    point(s): relative error (predicted - measured) / measured, whether the measured point
    lies in the predicted interval, and whether the two intervals overlap.  Returns a dict
    with ``possible`` False and a ``reason`` when too few sizes remain."""
    used = full.points
    largest = max(p.model_params for p in used)
    rest = [p for p in used if p.model_params != largest]
    if len({p.model_params for p in rest}) < 2:
        return {
            "possible": False,
            "reason": "needs located collapse points at 3 or more model sizes",
        }
    try:
        law = fit_law(rest, full.confidence)
    except LawInputError as e:
        return {"possible": False, "reason": str(e)}
    if law.use_tokens != full.use_tokens:
        return {
            "possible": False,
            "reason": "without the largest size, the remaining points span one token budget",
        }
    checks = []
    for p in (q for q in used if q.model_params == largest):
        pred, lo, hi = (float(v[0]) for v in law.predict(p.model_params, p.tokens))
        checks.append({
            "model_params": p.model_params,
            "tokens": p.tokens,
            "measured": p.collapse_infusion,
            "measured_ci": list(p.ci),
            "predicted": pred,
            "predicted_interval": [lo, hi],
            "relative_error": (pred - p.collapse_infusion) / p.collapse_infusion,
            "measured_in_interval": bool(lo <= p.collapse_infusion <= hi),
            "intervals_overlap": bool(lo <= p.ci[1] and p.ci[0] <= hi),
        })
    return {
        "possible": True,
        "held_out_model_params": largest,
        "fitted_on_sizes": sorted({p.model_params for p in rest}),
        "exponent_without_largest": law.exponent,
        "points": checks,
    }
