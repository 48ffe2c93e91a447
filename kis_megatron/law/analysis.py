"""The whole law analysis of one table, as a value: select curves, locate collapse points,
fit the paper's law (jointly, or in two stages) and the exposure forms, select the form the
ladder supports (select.py), check it on the largest model, say which regime the ladder is
in (regime.py), check the prediction against a larger validation model when its runs are
given, predict, and recommend how much to infuse into a target (recommend.py).  report.py
and plots.py render it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from kis_megatron.law.collapse import COLLAPSE, CollapsePoint, detect_collapse, level_means
from kis_megatron.law.exposure import ExposureAccounting, exposure_accounting
from kis_megatron.law.fit import TERMS, LawFit, fit_points
from kis_megatron.law.forms import FORM_NAMES
from kis_megatron.law.joint import fit_curves
from kis_megatron.law.noise import SpreadSums, run_spread
from kis_megatron.law.recommend import parse_recommend, recommend
from kis_megatron.law.regime import exposures_at_collapse, support, supported, top_slope
from kis_megatron.law.select import Selection, agreement, select_form
from kis_megatron.law.table import Curve, LawInputError, select_curves


FITS = ("joint", "two-stage")
# Bootstrap stream of a validation curve (``locate``'s ``stream``), so a sweep that checks
# the same curve (sweep/validate.py) reproduces fit_law's interval exactly.
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
    forms: tuple[str, ...] = FORM_NAMES  # the forms selection chooses from (forms.py)
    retain: float = 0.9  # the recommendation keeps retention >= retain x the plateau

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
        unknown = [f for f in self.forms if f not in FORM_NAMES]
        if unknown or "power" not in self.forms:
            raise LawInputError(f"--forms takes a comma-separated subset of {', '.join(FORM_NAMES)} "
                                f"that includes power, got {','.join(self.forms)}")
        if not 0.0 < self.retain < 1.0:
            raise LawInputError(f"--retain must be in (0, 1), got {self.retain}")


@dataclass
class Analysis:
    options: Options
    infusion_kind: str
    curves: list[Curve]
    points: list[CollapsePoint]
    law: LawFit  # the paper's power law (coefficient, exponent: DESIGN.md's keys)
    heldout: dict
    selection: Selection | None = None
    accounting: ExposureAccounting | None = None
    regime: dict = field(default_factory=dict)
    prediction: dict | None = None
    recommendation: dict | None = None
    sources: list[str] = field(default_factory=list)
    validation: dict | None = None
    validation_curve: Curve | None = None
    validation_point: CollapsePoint | None = None
    validation_seed_points: list[tuple[float, CollapsePoint]] = field(default_factory=list)


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


def predict(result: "Analysis", n: float, d: float | None) -> dict:
    """The selected form's predicted collapse infusion of a target model, with the interval
    spanning the credible forms (select.py)."""
    sel = result.selection
    pred = sel.predict(n, d)
    law = sel.law
    sizes = [p.model_params for p in law.points]
    notes = []
    if n > max(sizes) or n < min(sizes):
        notes.append(f"extrapolates in N by {n / (max(sizes) if n > max(sizes) else min(sizes)):.3g}x")
    if d is not None and not law.use_tokens:
        budgets = sorted({p.tokens for p in law.points})
        if len(budgets) == 1:
            notes.append(f"the law has no D term (collapse points at D={budgets[0]:.4g} only); "
                         "D sets only the target's renderings" if sel.accounting else
                         f"the law has no D term (collapse points at D={budgets[0]:.4g} only); D is not used")
        else:
            notes.append("the law has no D term (see the law's note)")
    ok, why = supported(result.regime["support"], n, d)
    return {
        "model_params": n, "tokens": d,
        "collapse_infusion": pred["collapse_infusion"], "interval": pred["interval"],
        "confidence": law.confidence, "form": pred["form"], "per_form": pred["per_form"],
        "supported": ok, "unsupported_because": why or None, "note": "; ".join(notes),
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


def locate(curves: list[Curve], options: Options, stream: int = 0, spread: float | None = None,
           reference: float | None = None) -> list[CollapsePoint]:
    """Each curve's collapse point by the documented detector (collapse.py): its interval from
    the run-to-run spread pooled over ``curves`` (or ``spread``), its plateau checked against the
    median plateau of the other curves (or ``reference``); bootstrap streams are independent
    per curve (``stream`` separates other sets of curves)."""
    if spread is None:
        spread = pooled_spread(curves, options)
    tops = [float(level_means(c.infusion, c.value)[1].max()) for c in curves]
    out = []
    for i, curve in enumerate(curves):
        others = tops[:i] + tops[i + 1:]
        ref = reference if reference is not None else (float(np.median(others)) if others else None)
        out.append(detect_collapse(
            curve, fraction=options.fraction, chance=options.chance, min_drop=options.min_drop,
            n_boot=options.n_boot, confidence=options.confidence, ceiling=ceiling_of(options),
            spread=spread, reference_plateau=ref,
            rng=np.random.default_rng([options.seed, i] + ([stream] if stream else []))))
    return out


def pooled_spread(curves: list[Curve], options: Options) -> float | None:
    """The run-to-run spread from the residuals of every located curve's step fit together
    (noise.py); None without probe counts."""
    fits = [detect_collapse(c, fraction=options.fraction, chance=options.chance,
                            min_drop=options.min_drop, n_boot=0, ceiling=ceiling_of(options))
            for c in curves]
    sums = [p.spread_sums for p in fits if p.spread_sums is not None]
    return run_spread(sum(sums, SpreadSums())) if sums else None


def fit_law(curves: list[Curve], points: list[CollapsePoint], options: Options, form: str = "power",
            scales: list[float] | None = None) -> LawFit:
    """The law in ``form`` from located curves, by ``options.fit``: jointly on the curves
    (joint.fit_curves, the default) or on their collapse points (fit.fit_points, two-stage:
    power only). The one verb for fitting; the others are its two methods."""
    if options.fit == "two-stage":
        return fit_points(points, options.confidence, options.terms)
    seed = [options.seed, 1_000_003] + ([FORM_NAMES.index(form)] if form != "power" else [])
    return fit_curves(curves, points, chance=options.chance, fraction=options.fraction,
                      n_boot=options.n_boot, confidence=options.confidence,
                      rng=np.random.default_rng(seed), terms=options.terms,
                      form=form, scales=scales)


def analyze(rows: list[dict], options: Options, target: str | None = None,
            validation_rows: list[dict] | None = None, recommend_target: str | None = None) -> Analysis:
    """Run the analysis on table rows (and, with ``validation_rows``, check the selected
    law's prediction for the larger model those rows measured; they never enter the fit).
    ``target``: 'N[,D]' to predict; ``recommend_target``: 'N,D[,share]' to recommend for.
    Raises LawInputError with one clear message for any input problem (see
    table.select_curves and fit.fit_points)."""
    options.validate()
    if options.chance == "auto":
        options = replace(options, chance=logged_chance(rows, options.metric))
    target_nd = parse_target(target) if target else None
    rec_target = parse_recommend(recommend_target) if recommend_target else None
    curves, kind = select_curves(rows, options.metric, options.infusion_kind)
    points = locate(curves, options)
    law = fit_law(curves, points, options)
    accounting, why = exposure_accounting(curves, kind)
    forms = options.forms if options.fit == "joint" else ("power",)
    if options.fit != "joint":
        why = "the exposure forms are fitted jointly only (--fit joint)"

    def fit_form(cs, ps, name, scales):
        if name == "power" and len(cs) == len(curves):
            return law
        return fit_law(cs, ps, options, name, scales)

    selection = select_form(curves, points, fit_form, accounting=accounting, unavailable=why,
                            forms=forms)
    result = Analysis(options, kind, curves, points, law, selection.fits["power"].heldout,
                      selection=selection, accounting=accounting)
    result.regime["ladder_plateau"] = ladder_plateau(curves)
    if accounting is not None:
        result.regime["exposures_at_collapse"] = exposures_at_collapse(curves, points, accounting)
        result.regime["top_slope"] = top_slope(curves, points, accounting, options.confidence)
    if validation_rows is not None:
        validate(result, validation_rows)
    result.regime["support"] = support(points, result.validation, bool(law.note and "D/N" in law.note))
    if target_nd:
        result.prediction = predict(result, *target_nd)
    if rec_target:
        result.recommendation = recommend_for(result, *rec_target)
    return result


def recommend_for(result: Analysis, n: float, d: float, share: float | None) -> dict:
    """recommend.recommend with the support and the validation's verdict."""
    o = result.options
    rec = recommend(result.selection, n, d, share, q=o.retain, fraction=o.fraction,
                    chance=o.chance if isinstance(o.chance, float) else None)
    ok, why = supported(result.regime["support"], n, d)
    v = result.validation
    if v and v.get("measured") is not None and not v["passed"]:
        why = (f"the law missed its validation at N={v['model_params']:.3g} by "
               f"{100 * v['rel_error']:+.0f}% (predicted {v['predicted']:.4g}, measured "
               f"{v['measured']:.4g})" + (f"; {why}" if why else ""))
        ok = ok and n <= max(p.model_params for p in result.selection.law.points)
    rec["supported"] = ok
    rec["unsupported_because"] = None if ok else why
    return rec


PASS_WITHIN = 0.25  # the validation passes within 25% and inside the interval


def validate(result: Analysis, rows: list[dict]) -> None:
    """Locate the validation model's collapse point with the same detector and settings (its
    seeds pooled, the run-to-run spread pooled with the ladder's), and each seed's own; compare
    the selected law's prediction with it (select.agreement) into ``result.validation``."""
    o = result.options
    curves, kind = select_curves(rows, o.metric, o.infusion_kind, min_sizes=1)
    if kind != result.infusion_kind:
        raise LawInputError(f"the validation runs vary {kind!r}, the ladder {result.infusion_kind!r}")
    if len(curves) != 1:
        shown = ", ".join(c.label for c in curves)
        raise LawInputError(f"validation runs must hold one model size at one budget; they hold {shown}")
    sel = result.selection
    fitted = {p.model_params for p in sel.law.points}
    curve = curves[0]
    if curve.model_params in fitted:
        raise LawInputError(f"the validation model (N={curve.model_params:.4g}) is one of the "
                            "ladder's fitted sizes; validate a held-out size")
    spread = pooled_spread(result.curves + [curve], o)
    ref = ladder_plateau(result.curves)
    point = locate([curve], o, stream=VALIDATION_STREAM, spread=spread, reference=ref)[0]
    acc_val, _ = exposure_accounting([curve], kind)
    share = None
    if acc_val is not None and acc_val.share is not None:
        share = acc_val.share
    pred = sel.predict(curve.model_params, curve.tokens, share)
    value, (lo, hi) = pred["collapse_infusion"], pred["interval"]
    check = {"model_params": curve.model_params, "tokens": curve.tokens, "predicted": value,
             "interval": [lo, hi], "form": pred["form"], "per_form": pred["per_form"],
             "status": point.status}
    if point.status != COLLAPSE:
        bound = point.lower_bound if point.lower_bound is not None else point.upper_bound
        side = "above" if point.lower_bound is not None else "below"
        check |= {"measured": None, "measured_ci": None, "rel_error": None, "inside": False,
                  "inside_prediction_interval": False, "passed": False, "measured_bound": bound,
                  "note": f"the measured curve gives only a bound: collapse {side} {bound:.4g} ({point.note})"}
    else:
        check |= {"measured": point.collapse_infusion, "measured_ci": list(point.ci)}
        check |= agreement(value, (lo, hi), point.collapse_infusion, point.ci)
        check["passed"] = bool(check["inside"] and abs(check["rel_error"]) <= PASS_WITHIN)
    check["levels"] = sorted({float(v) for v in curve.infusion})
    check["runs"] = int(curve.infusion.size)
    check["extrapolation"] = curve.model_params / max(fitted)
    check["exposures_at_collapse"] = (curve.exposures_at(point.collapse_infusion)
                                      if point.collapse_infusion is not None else None)
    result.validation_seed_points = _seed_points(curve, o, spread, ref)
    if result.validation_seed_points:
        seeds = [{"seed": s, "status": p.status, "collapse_infusion": p.collapse_infusion,
                  "ci": list(p.ci) if p.ci else None} for s, p in result.validation_seed_points]
        check["seeds"] = seeds
        located = [math.log10(x["collapse_infusion"]) for x in seeds if x["collapse_infusion"]]
        check["seed_spread_log10"] = float(np.std(located, ddof=1)) if len(located) > 1 else None
    result.validation, result.validation_curve, result.validation_point = check, curve, point


def ladder_plateau(curves: list[Curve]) -> float:
    """The median over the ladder's curves of their highest level mean (the reference a
    validation curve's plateau is checked against, collapse.py step 5)."""
    return float(np.median([level_means(c.infusion, c.value)[1].max() for c in curves]))


def _seed_points(curve: Curve, options: Options, spread, ref) -> list[tuple[float, CollapsePoint]]:
    """Each seed's own collapse point, when the curve holds several seeds with 4+ levels each."""
    if curve.seeds is None or np.unique(curve.seeds).size < 2:
        return []
    out = []
    for j, s in enumerate(np.unique(curve.seeds)):
        m = curve.seeds == s
        if np.unique(curve.infusion[m]).size < 4:
            continue
        sub = Curve(curve.model_params, curve.tokens, curve.infusion[m], curve.value[m],
                    curve.n_probes[m] if curve.n_probes is not None else None,
                    curve.exposures[m] if curve.exposures is not None else None,
                    curve.domain_tokens[m] if curve.domain_tokens is not None else None,
                    curve.seeds[m])
        out.append((float(s), locate([sub], options, stream=VALIDATION_STREAM + 1 + j, spread=spread,
                                     reference=ref)[0]))
    return out
