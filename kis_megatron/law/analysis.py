"""The whole law analysis of one table, as a value: select curves, locate collapse points,
fit the law (jointly, or in two stages), check it on the largest model, predict, and check
the prediction against a larger validation model when its runs are given.  report.py and
plots.py render it."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from kis_megatron.law.collapse import CollapsePoint, detect_collapse
from kis_megatron.law.fit import TERMS, LawFit, check_prediction, fit_law, leave_largest_out
from kis_megatron.law.joint import fit_law_joint
from kis_megatron.law.table import Curve, LawInputError, select_curves


FITS = ("joint", "two-stage")
# Bootstrap stream of a validation curve (``locate``'s ``stream``), so a sweep that checks
# the same curve (sweep_validate.py) reproduces fit_law's interval exactly.
VALIDATION_STREAM = 7


@dataclass
class Options:
    """Choices of the analysis; defaults are the documented ones."""

    metric: str = "retention/domain"
    infusion_kind: str | None = None
    fraction: float = 0.5
    chance: float | str | None = None  # a number, None (fitted floor) or "auto"
    min_drop: float = 0.1
    n_boot: int = 1000
    seed: int = 0
    confidence: float = 0.95
    ceiling: float | str | None = "auto"  # a number, None, or "auto": 1 for accuracies
    fit: str = "joint"  # joint | two-stage (see joint.py and fit.py)
    terms: str = "auto"  # auto | N | N,D (fit.law_design)

    def validate(self) -> None:
        if self.fit not in FITS:
            raise LawInputError(f"--fit takes {' or '.join(FITS)}, got {self.fit!r}")
        if self.terms not in TERMS:
            raise LawInputError(f"--terms takes {', '.join(TERMS)}, got {self.terms!r}")
        if not 0.0 < self.fraction < 1.0:
            raise LawInputError(f"--fraction must be in (0, 1), got {self.fraction}")
        if not self.min_drop > 0:
            raise LawInputError(f"--min-drop must be > 0, got {self.min_drop}")
        if self.n_boot < 10:
            raise LawInputError(f"--bootstrap must be at least 10, got {self.n_boot}")
        if not 0.5 <= self.confidence < 1.0:
            raise LawInputError(f"--confidence must be in [0.5, 1), got {self.confidence}")
        if isinstance(self.ceiling, str) and self.ceiling != "auto":
            raise LawInputError(f"--ceiling takes a number, 'auto' or 'none', got {self.ceiling!r}")
        if isinstance(self.chance, str):
            if self.chance != "auto":
                raise LawInputError(f"--chance takes a number or 'auto', got {self.chance!r}")
        elif self.chance is not None and not np.isfinite(self.chance):
            raise LawInputError("--chance must be a finite number")


@dataclass
class Analysis:
    options: Options
    infusion_kind: str
    curves: list[Curve]
    points: list[CollapsePoint]
    law: LawFit
    heldout: dict
    prediction: dict | None = None
    sources: list[str] = field(default_factory=list)
    validation: dict | None = None
    validation_curve: Curve | None = None
    validation_point: CollapsePoint | None = None


def parse_target(text: str) -> tuple[float, float | None]:
    """'N' or 'N,D' (e.g. '1e9,2e10') -> (N, D or None), both > 0."""
    parts = text.split(",")
    try:
        vals = [float(p) for p in parts]
    except ValueError:
        raise LawInputError(f"--predict takes N or N,D as numbers (e.g. 1e9,2e10), got {text!r}") from None
    if len(vals) not in (1, 2) or not all(np.isfinite(v) and v > 0 for v in vals):
        raise LawInputError(f"--predict takes N or N,D, each > 0, got {text!r}")
    return vals[0], (vals[1] if len(vals) == 2 else None)


def predict(law: LawFit, n: float, d: float | None) -> dict:
    """Predicted collapse infusion of a target model with its bootstrap interval.  Keeping
    the infusion below the interval's lower end avoids the collapse with the stated
    confidence (under the fitted law)."""
    value, lo, hi = (float(v[0]) for v in law.predict(n, d))
    sizes = [p.model_params for p in law.points]
    notes = []
    if n > max(sizes) or n < min(sizes):
        notes.append(f"extrapolates in N by {n / (max(sizes) if n > max(sizes) else min(sizes)):.3g}x")
    if d is not None and law.use_tokens:
        budgets = [p.tokens for p in law.points]
        if d > max(budgets) or d < min(budgets):
            notes.append(f"extrapolates in D by {d / (max(budgets) if d > max(budgets) else min(budgets)):.3g}x")
    if d is not None and not law.use_tokens:
        budgets = sorted({p.tokens for p in law.points})
        if len(budgets) == 1:
            notes.append(f"the law has no D term (collapse points at D={budgets[0]:.4g} only); D is not used")
        else:
            notes.append("the law has no D term (see the law's note); D is not used")
    return {
        "model_params": n,
        "tokens": d,
        "collapse_infusion": value,
        "interval": [lo, hi],
        "confidence": law.confidence,
        "safe_infusion": lo,
        "note": "; ".join(notes),
    }


def logged_chance(rows: list[dict], metric: str) -> float:
    """The chance level the evaluator logged for ``metric``: the mean of the
    ``retention_chance/<name>`` rows for ``retention/<name>`` (or retention_heldout/...),
    i.e. the average of 1 / (1 + distractors) over the probes."""
    name = metric.split("/", 1)[-1]
    vals = [r["value"] for r in rows if r.get("metric") == f"retention_chance/{name}"]
    vals = [v for v in vals if v is not None and np.isfinite(v)]
    if not metric.startswith("retention") or not vals:
        raise LawInputError(
            f"--chance auto needs retention_chance/{name} rows in the table for {metric}; "
            "give the chance level as a number instead"
        )
    return float(np.mean(vals))


ACCURACY_PREFIXES = ("retention", "exact_match")


def ceiling_of(options: Options) -> float | None:
    """The metric's largest possible value: ``options.ceiling``, with "auto" meaning 1 for
    an accuracy (retention*, exact_match*) and none otherwise."""
    if options.ceiling == "auto":
        return 1.0 if options.metric.startswith(ACCURACY_PREFIXES) else None
    return options.ceiling


def locate(curves: list[Curve], options: Options, stream: int = 0) -> list[CollapsePoint]:
    """Each curve's collapse point by the documented detector (collapse.py); bootstrap
    streams are independent per curve (``stream`` separates other sets of curves)."""
    return [
        detect_collapse(curve, fraction=options.fraction, chance=options.chance,
                        min_drop=options.min_drop, n_boot=options.n_boot,
                        confidence=options.confidence, ceiling=ceiling_of(options),
                        rng=np.random.default_rng([options.seed, i] + ([stream] if stream else [])))
        for i, curve in enumerate(curves)
    ]


def fit(curves: list[Curve], points: list[CollapsePoint], options: Options) -> LawFit:
    """The law from located curves, by ``options.fit``."""
    if options.fit == "two-stage":
        return fit_law(points, options.confidence, options.terms)
    return fit_law_joint(curves, points, chance=options.chance, fraction=options.fraction,
                         n_boot=options.n_boot, confidence=options.confidence,
                         rng=np.random.default_rng([options.seed, 1_000_003]), terms=options.terms)


def analyze(rows: list[dict], options: Options, target: str | None = None,
            validation_rows: list[dict] | None = None) -> Analysis:
    """Run the analysis on table rows (and, with ``validation_rows``, check the law's
    prediction for the larger model those rows measured; they never enter the fit).
    Raises LawInputError with one clear message for any input problem (see
    table.select_curves and fit.fit_law)."""
    options.validate()
    if options.chance == "auto":
        options = replace(options, chance=logged_chance(rows, options.metric))
    target_nd = parse_target(target) if target else None
    curves, kind = select_curves(rows, options.metric, options.infusion_kind)
    points = locate(curves, options)
    law = fit(curves, points, options)

    def refit(subset: list[CollapsePoint]) -> LawFit:
        keep = [i for i, p in enumerate(points) if any(p is q for q in subset)]
        return fit([curves[i] for i in keep], [points[i] for i in keep], options)

    result = Analysis(options, kind, curves, points, law, leave_largest_out(law, refit))
    if target_nd:
        result.prediction = predict(law, *target_nd)
    if validation_rows is not None:
        validate(result, validation_rows)
    return result


def validate(result: Analysis, rows: list[dict]) -> None:
    """Locate the validation model's collapse point with the same detector and settings,
    and compare it with the law's prediction (fit.check_prediction) into
    ``result.validation``."""
    o = result.options
    curves, kind = select_curves(rows, o.metric, o.infusion_kind, min_sizes=1)
    if kind != result.infusion_kind:
        raise LawInputError(f"the validation runs vary {kind!r}, the ladder {result.infusion_kind!r}")
    if len(curves) != 1:
        shown = ", ".join(c.label for c in curves)
        raise LawInputError(f"validation runs must hold one model size at one budget; they hold {shown}")
    fitted = {p.model_params for p in result.law.points}
    curve = curves[0]
    if curve.model_params in fitted:
        raise LawInputError(f"the validation model (N={curve.model_params:.4g}) is one of the "
                            "ladder's fitted sizes; validate a held-out size")
    point = locate([curve], o, stream=VALIDATION_STREAM)[0]
    check = check_prediction(result.law, point)
    check["levels"] = sorted({float(v) for v in curve.infusion})
    check["runs"] = int(curve.infusion.size)
    check["extrapolation"] = curve.model_params / max(fitted)
    check["exposures_at_collapse"] = (curve.exposures_at(point.collapse_infusion)
                                      if point.collapse_infusion is not None else None)
    result.validation, result.validation_curve, result.validation_point = check, curve, point
