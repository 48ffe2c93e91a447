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
from typing import Callable

import numpy as np

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint
from kis_megatron.law.forms import Covariates, Form, PowerForm
from kis_megatron.law.table import LawInputError


def design_matrix(n, d, use_tokens: bool) -> np.ndarray:
    """Rows [1, log10 N (, log10 D)]."""
    n = np.atleast_1d(np.asarray(n, dtype=float))
    cols = [np.ones_like(n), np.log10(n)]
    if use_tokens:
        cols.append(np.log10(np.broadcast_to(np.asarray(d, dtype=float), n.shape)))
    return np.stack(cols, axis=1)


@dataclass
class LawFit:
    """A fitted law: ``coef`` (the form's parameters; for the paper's power form
    [log10 a, b (, c)]) and its bootstrap replicates.  ``form`` maps them to collapse points
    (forms.py); the two-stage fit and the default joint fit are the power form."""

    coef: np.ndarray  # (p,)
    boot_coef: np.ndarray  # (R, p)
    use_tokens: bool
    confidence: float
    points: list[CollapsePoint]
    rms_log10_residual: float
    dropped_replicates: int
    method: str = "two-stage"
    note: str = ""  # how the law's terms were chosen, when that needs saying (law_design)
    form: Form | None = None  # None: the power form on these points
    exposure_slope: float = -1.0  # E = K * infusion^s of the curves (forms.Covariates)
    # the joint fit's goodness: residual sum of squares, measurements, fitted parameters
    rss: float | None = None
    n_obs: int = 0
    n_params: int = 0
    curve_shapes: object = None  # joint.CurveShapes: the fitted falls, for the recommendation
    curve_sd: float = 0.0  # spread of the curves' collapse points about the law (joint.curve_scatter)

    def __post_init__(self):
        if self.form is None:
            n = np.array([p.model_params for p in self.points], dtype=float)
            d = np.array([p.tokens for p in self.points], dtype=float)
            self.form = PowerForm(Covariates.of(n, d), self.use_tokens)

    @property
    def form_name(self) -> str:
        return self.form.name

    @property
    def coefficient(self) -> float:
        self._power_only("coefficient")
        return float(10 ** self.coef[0])

    @property
    def exponent(self) -> float:
        self._power_only("exponent")
        return float(self.coef[1])

    @property
    def tokens_exponent(self) -> float | None:
        self._power_only("tokens_exponent")
        return float(self.coef[2]) if self.use_tokens else None

    def _power_only(self, what: str) -> None:
        if self.form.name != "power":
            raise AttributeError(f"{what} is a parameter of the power form, not of {self.form.name}")

    def _interval(self, samples: np.ndarray) -> tuple[float, float]:
        alpha = (1.0 - self.confidence) / 2
        lo, hi = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
        return float(lo), float(hi)

    def coef_ci(self, k: int) -> tuple[float, float]:
        """Percentile interval of parameter k (power form: 0: log10 a, 1: b, 2: c)."""
        return self._interval(self.boot_coef[:, k])

    def coefficient_ci(self) -> tuple[float, float]:
        lo, hi = self.coef_ci(0)
        return 10**lo, 10**hi

    def parameters(self) -> dict:
        """The form's parameters as reported (forms.Form.describe), each with its percentile
        interval under ``<name>_ci``."""
        value = self.form.describe(self.coef)
        reps = [self.form.describe(b) for b in self.boot_coef]
        out = {}
        for key, v in value.items():
            out[key] = v
            samples = np.array([r[key] for r in reps], dtype=float)
            if np.ptp(samples) > 0 or key not in ("N0", "D0"):
                out[f"{key}_ci"] = list(self._interval(samples))
        return out

    def covariates(self, n, d=None, k=None) -> Covariates:
        """The form's inputs at sizes ``n`` (budgets ``d``, exposure scales ``k``), checked."""
        if self.use_tokens and d is None:
            raise LawInputError(
                "the law depends on the token budget D: give the target as N,D "
                "(for example --predict 1e9,2e10)"
            )
        if self.form.uses_exposures and k is None:
            raise LawInputError(f"the {self.form.name} form predicts exposures per fact: the target's "
                                "renderings (its exposure scale) are needed")
        return Covariates.of(n, d, k, self.exposure_slope)

    def predict_log10(self, n, d=None, k=None) -> tuple[np.ndarray, np.ndarray]:
        """log10 collapse infusion at the targets and its bootstrap replicates (R, len(n))."""
        cov = self.covariates(n, d, k)
        return self.form.xc(self.coef, cov), self.form.xc(self.boot_coef, cov)

    def predict(self, n, d=None, k=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted collapse infusion at sizes ``n`` (budgets ``d``; exposure scales ``k`` for
        the exposure forms) with the lower and upper ends of its bootstrap interval."""
        pred, samples = self.predict_log10(n, d, k)
        alpha = (1.0 - self.confidence) / 2
        lo, hi = np.quantile(samples, [alpha, 1.0 - alpha], axis=0)
        return 10**pred, 10**lo, 10**hi

    def form_text(self) -> str:
        return self.form.formula


def usable_points(points: list[CollapsePoint]) -> list[CollapsePoint]:
    """Collapse points that were located (the bounds are excluded from the fit)."""
    return [p for p in points if p.status == COLLAPSE]


TERMS = ("auto", "N", "N,D")


def law_design(points: list[CollapsePoint], terms: str = "auto") -> tuple[np.ndarray, bool, str]:
    """The design matrix of the law for the located ones of ``points``, whether D is a term,
    and a note.

    ``terms``: "N,D" fits CP = a N^b D^c (the budgets must vary apart from the sizes);
    "N" fits CP = a N^b whatever the budgets; "auto" adds D when the budgets vary and can be
    separated from the sizes, and otherwise fits N alone, saying so: a ladder whose budget
    grows with its size (e.g. 20 tokens per parameter) measures the law along that rule."""
    if terms not in TERMS:
        raise LawInputError(f"--terms takes {', '.join(TERMS)}, got {terms!r}")
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
    varies = np.unique(d).size > 1
    if terms == "N" or not varies:
        note = ("the token budgets vary, but the law is fitted in N alone (--terms N): it holds "
                "along the ladder's budgets" if varies else "")
        return design_matrix(n, d, False), False, note
    x = design_matrix(n, d, True)
    if np.linalg.matrix_rank(x) == x.shape[1]:
        return x, True, ""
    if terms == "N,D":
        raise LawInputError(
            "the located collapse points change model size and token budget together, so "
            "their effects cannot be separated; add runs of one size at several budgets"
        )
    ratio = np.unique(np.round(d / n, 6))
    return design_matrix(n, d, False), False, (
        "the token budget changes together with the model size (D/N = "
        f"{', '.join(f'{r:.3g}' for r in ratio[:4])}), so D cannot be separated from N: the law "
        "is fitted in N and holds for targets trained on the ladder's budget rule")


def fit_points(points: list[CollapsePoint], confidence: float = 0.95, terms: str = "auto") -> LawFit:
    """Fit CP = a N^b (D^c, see :func:`law_design`) to the located collapse points by
    least squares in log10, with pipeline-bootstrap replicates (see module docstring).
    Raises LawInputError when fewer than two model sizes have a located collapse, or when
    D is asked for but cannot be separated from N."""
    used = usable_points(points)
    x, use_tokens, note = law_design(points, terms)
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
        note=note,
    )


def check_prediction(law: LawFit, point: CollapsePoint) -> dict:
    """The law's prediction for ``point``'s size and budget against its measured collapse
    point: relative error (predicted - measured) / measured, whether the measured point
    lies in the predicted interval, and whether the two intervals overlap.  A point that
    is only a bound is compared as a bound (``measured`` is None, ``inside`` False)."""
    pred, lo, hi = (float(v[0]) for v in law.predict(point.model_params, point.tokens))
    out = {
        "model_params": point.model_params,
        "tokens": point.tokens,
        "predicted": pred,
        "interval": [lo, hi],
        "status": point.status,
    }
    if point.status != COLLAPSE:
        bound = point.lower_bound if point.lower_bound is not None else point.upper_bound
        side = "above" if point.lower_bound is not None else "below"
        return out | {
            "measured": None, "measured_ci": None, "rel_error": None, "inside": False,
            "intervals_overlap": None, "measured_bound": bound,
            "note": f"the measured curve gives only a bound: collapse {side} {bound:.4g} ({point.note})",
        }
    m = point.collapse_infusion
    return out | {
        "measured": m,
        "measured_ci": list(point.ci),
        "rel_error": (pred - m) / m,
        "inside": bool(lo <= m <= hi),
        "intervals_overlap": bool(lo <= point.ci[1] and point.ci[0] <= hi),
    }


def leave_largest_out(full: LawFit, refit: Callable[[list[CollapsePoint]], LawFit]) -> dict:
    """Refit the law without its largest model size (``refit`` fits the given points with
    the same method as ``full``) and check its prediction for that size's collapse
    point(s) (:func:`check_prediction`).  Returns a dict with ``possible`` False and a
    ``reason`` when too few sizes remain."""
    used = full.points
    largest = max(p.model_params for p in used)
    rest = [p for p in used if p.model_params != largest]
    if len({p.model_params for p in rest}) < 2:
        return {
            "possible": False,
            "reason": "needs located collapse points at 3 or more model sizes",
        }
    try:
        law = refit(rest)
    except LawInputError as e:
        return {"possible": False, "reason": str(e)}
    if law.use_tokens != full.use_tokens:
        return {
            "possible": False,
            "reason": "without the largest size, the remaining points span one token budget",
        }
    return {
        "possible": True,
        "held_out_model_params": largest,
        "fitted_on_sizes": sorted({p.model_params for p in rest}),
        "exponent_without_largest": law.exponent,
        "exponent_ci_without_largest": list(law.coef_ci(1)),
        "points": [check_prediction(law, p) for p in used if p.model_params == largest],
    }
