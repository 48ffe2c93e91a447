"""law.json, report.md and the plots of an analysis.  Every file is written under a
temporary name and renamed into place, law.json last (it lists the others, so a reader that
finds law.json finds its files); files of an earlier fit_law output that this one does not
write again are removed, and nothing else in the directory is touched."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile

from kis_megatron.law import collapse as collapse_mod
from kis_megatron.law.analysis import Analysis
from kis_megatron.law.collapse import COLLAPSE
from kis_megatron.law.plots import plot_curves, plot_law, plot_validation
from kis_megatron.law.table import LawInputError, write_table
from kis_megatron.utils import atomic_write_bytes

PLOTS = ("retention_curves.png", "law.png")
VALIDATION_PLOT = "validation.png"


def _clean(obj):
    """JSON-safe: NaN/inf become null, tuples lists, numpy scalars floats."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item"):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def law_json(a: Analysis) -> dict:
    """The law.json content (DESIGN.md keys first)."""
    law, o = a.law, a.options
    return _clean({
        "coefficient": law.coefficient,
        "coefficient_ci": list(law.coefficient_ci()),
        "exponent": law.exponent,
        "exponent_ci": list(law.coef_ci(1)),
        "tokens_exponent": law.tokens_exponent,
        "tokens_exponent_ci": list(law.coef_ci(2)) if law.use_tokens else None,
        "form": law.form(),
        "law_note": law.note or None,
        "collapse_points": [p.to_json() | {"used_in_fit": p.status == COLLAPSE,
                                           "exposures_at_collapse": _exposures(c, p)}
                            for c, p in zip(a.curves, a.points)],
        "prediction": a.prediction,
        "heldout": a.heldout,
        "validation": a.validation,
        "metric": o.metric,
        "infusion_kind": a.infusion_kind,
        "n_points": len(law.points),
        "model_sizes": sorted({p.model_params for p in law.points}),
        "token_budgets": sorted({p.tokens for p in law.points}),
        "rms_log10_residual": law.rms_log10_residual,
        "method": {
            "fit": law.method,
            "collapse": "smooth step in log10(infusion) after the plateau start; collapse where "
            "retention above the floor falls to `fraction` of the plateau; residual bootstrap",
            "law": LAW_METHOD[law.method],
            "fraction": o.fraction,
            "chance": o.chance,
            "min_drop": o.min_drop,
            "ceiling": o.ceiling,
            "bootstrap": o.n_boot,
            "bootstrap_dropped": law.dropped_replicates,
            "seed": o.seed,
            "confidence": o.confidence,
        },
        "sources": a.sources,
        "plots": plots_of(a),
    })


LAW_METHOD = {
    "joint": "all located curves fitted at once, each curve's collapse point on the law, each "
    "curve's plateau and width its own; bootstrap over measurements (runs resampled within "
    "levels when repeated, else wild), the whole fit repeated per replicate",
    "two-stage": "least squares in log10 space through the per-curve collapse points; "
    "pipeline bootstrap over curve replicates",
}


def _exposures(curve, point) -> float | None:
    """Mean exposures per fact at the collapse point (the trainer logs them per run)."""
    return curve.exposures_at(point.collapse_infusion) if point.status == COLLAPSE else None


def plots_of(a: Analysis) -> list[str]:
    return list(PLOTS) + ([VALIDATION_PLOT] if a.validation else [])


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _ci(ci) -> str:
    return "-" if not ci else f"[{ci[0]:.4g}, {ci[1]:.4g}]"


def report_markdown(a: Analysis) -> str:
    """The human report: what was fitted, how, the collapse points, the law with CIs, the
    held-out check, the prediction and the caveats."""
    law, o = a.law, a.options
    pct = f"{100 * o.confidence:g}%"
    located = [p for p in a.points if p.status == COLLAPSE]
    bounds = [p for p in a.points if p.status != COLLAPSE]
    lines = [
        "# Knowledge infusion scaling law",
        "",
        f"Metric `{o.metric}` against infusion (`{a.infusion_kind}`), "
        f"{len(a.curves)} retention curves, {len({c.model_params for c in a.curves})} model "
        f"sizes, {len({c.tokens for c in a.curves})} token budget(s).",
        "",
        "## Method",
        "",
        collapse_mod.__doc__.split("Method (the one this project documents and reports):")[1].strip(),
        "",
        f"Settings: fraction {o.fraction:g}, chance {o.chance if o.chance is not None else 'free floor'}, "
        f"min_drop {o.min_drop:g}, ceiling {o.ceiling if o.ceiling is not None else 'none'}, "
        f"{o.n_boot} bootstrap replicates (seed {o.seed}), "
        f"{pct} percentile intervals.",
        "",
        _law_method_text(law),
        "",
        "## Collapse points",
        "",
        "| N | D | status | collapse infusion | CI | bound | plateau | floor | threshold | exposures per fact at collapse |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    outside = []
    for c, p in zip(a.curves, a.points):
        bound = p.lower_bound if p.lower_bound is not None else p.upper_bound
        f = p.fit
        flag = ""
        if p.status == COLLAPSE and not p.ci[0] <= p.collapse_infusion <= p.ci[1]:
            flag = " (outside its CI)"
            outside.append(p)
        lines.append(
            f"| {p.model_params:.4g} | {p.tokens:.4g} | {p.status} | {_g(p.collapse_infusion)}{flag} | "
            f"{_ci(p.ci)} | {_g(bound)} | {_g(f and f.plateau)} | {_g(f and f.floor)} | "
            f"{_g(p.threshold)} | {_g(_exposures(c, p))} |"
        )
    if outside:
        lines += ["", f"{len(outside)} collapse point(s) lie outside their own percentile interval: "
                  "the bootstrap replicates fall mostly on one side of the fit (a skewed or "
                  "bimodal fall, often too few levels on the slope). Treat those intervals with "
                  "care; more levels on the fall (`tools/sweep.py --refine`) usually mend it."]
    if bounds:
        lines += ["", "Excluded from the fit (bounds, not located collapse points):", ""]
        lines += [f"- N={p.model_params:.4g}, D={p.tokens:.4g}: {p.status}: {p.note}" for p in bounds]
    lines += [
        "",
        "## Law",
        "",
        f"- form: {law.form()}, fitted on {len(located)} collapse points",
        f"- coefficient a = {law.coefficient:.4g}, {pct} CI {_ci(law.coefficient_ci())}",
        f"- exponent of N: b = {law.exponent:.4g}, {pct} CI {_ci(law.coef_ci(1))}",
    ]
    if law.use_tokens:
        lines.append(f"- exponent of D: c = {law.tokens_exponent:.4g}, {pct} CI {_ci(law.coef_ci(2))}")
    if law.note:
        lines.append(f"- note: {law.note}")
    lines += [f"- RMS residual in log10 (located collapse points about the law): "
              f"{law.rms_log10_residual:.3g}", "", "## Held-out check", ""]
    h = a.heldout
    if not h.get("possible"):
        lines.append(f"Not possible: {h['reason']}.")
    else:
        lines.append(f"Law refitted without N={h['held_out_model_params']:.4g} "
                     f"(exponent then {h['exponent_without_largest']:.4g}):")
        lines += _comparison_table(h["points"])
    lines += ["", "## Validation on a larger model", ""]
    lines += _validation_text(a)
    lines += ["", "## Prediction", ""]
    if a.prediction:
        pr = a.prediction
        d = f", D={pr['tokens']:.4g}" if pr["tokens"] else ""
        lines.append(
            f"N={pr['model_params']:.4g}{d}: collapse infusion {pr['collapse_infusion']:.4g}, "
            f"{pct} interval {_ci(pr['interval'])}; staying below {pr['safe_infusion']:.4g} "
            "avoids the collapse under the fitted law." + (f" Note: {pr['note']}." if pr["note"] else "")
        )
    else:
        lines.append("None requested (use --predict N[,D]).")
    n_sizes = len({p.model_params for p in located})
    lines += ["", "## Caveats", ""]
    if n_sizes < 4:
        lines.append(f"- Only {n_sizes} model sizes carry the law: its exponent and any "
                     "extrapolation are weakly constrained.")
    lines += [
        "- Intervals carry the measurement noise of the retention curves, not misfit of the "
        "power-law form; the held-out check and the RMS residual speak to the form.",
        "- A collapse point depends on the chosen fraction and floor; compare laws only at "
        "equal settings.",
    ]
    if bounds:
        lines.append(f"- {len(bounds)} curve(s) gave only a bound and were left out of the fit.")
    lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in plots_of(a)], ""]
    return "\n".join(lines)


def _law_method_text(law) -> str:
    if law.method == "joint":
        return (f"The law {law.form()} is fitted jointly: all located curves at once, each "
                "curve's collapse point on the law and its plateau and width its own "
                "(`kis_megatron/law/joint.py`); intervals from refitting the whole problem on "
                "bootstrap replicates of the measurements.")
    return (f"The law {law.form()} is fitted by least squares in log10 space to the located "
            "collapse points (two-stage fit); its intervals come from refitting it on every "
            "bootstrap replicate of all collapse points together.")


def _comparison_table(checks: list[dict]) -> list[str]:
    lines = ["", "| N | D | measured | measured CI | predicted | predicted interval | rel. error | in interval |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        if c["measured"] is None:
            measured, err = f"bound {_g(c.get('measured_bound'))}", "-"
        else:
            measured, err = f"{c['measured']:.4g}", f"{100 * c['rel_error']:+.1f}%"
        lines.append(
            f"| {c['model_params']:.4g} | {c['tokens']:.4g} | {measured} | {_ci(c['measured_ci'])} | "
            f"{c['predicted']:.4g} | {_ci(c['interval'])} | {err} | {'yes' if c['inside'] else 'no'} |"
        )
    return lines


def _validation_text(a: Analysis) -> list[str]:
    v = a.validation
    if not v:
        return ["None: no validation runs were given (`fit_law.py --validation-runs DIR`; the "
                "runs come from `tools/sweep.py SWEEP --validate law.json`)."]
    pct = f"{100 * a.options.confidence:g}%"
    lines = [f"The law fitted on the ladder above (the validation runs are not part of the fit) "
             f"predicts the collapse point of a model {v['extrapolation']:.3g}x larger than its "
             f"largest size; {v['runs']} runs of that model at {len(v['levels'])} levels "
             f"({', '.join(f'{x:.4g}' for x in v['levels'])}) measure it with the same detector."]
    lines += _comparison_table([v])
    lines.append("")
    if v["measured"] is None:
        lines.append(f"**Not measured**: {v['note']}.")
    else:
        verdict = "inside" if v["inside"] else "outside"
        lines.append(f"Measured {v['measured']:.4g} against predicted {v['predicted']:.4g}: "
                     f"{100 * v['rel_error']:+.1f}% relative error, {verdict} the {pct} "
                     "prediction interval.")
    seen = [(p.model_params, _exposures(c, p)) for c, p in zip(a.curves, a.points)]
    seen = [(n, e) for n, e in seen if e is not None]
    if seen and v.get("exposures_at_collapse"):
        seen.append((v["model_params"], v["exposures_at_collapse"]))
        lines += ["", "Mean exposures per fact at the collapse point (how often a fact was seen "
                  "where retention fell to half): " + ", ".join(f"N={n:.3g}: {e:.3g}" for n, e in seen)
                  + ". A power law in N holds while these keep falling with N; where they level off, "
                  "more parameters no longer buy fewer exposures and the law overpredicts."]
    return lines


def check_out_dir(out: str) -> None:
    """Refuse to overwrite a directory that is not an earlier fit_law output."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise LawInputError(f"--out {out} exists and is not a directory")
        if os.listdir(out) and not os.path.isfile(os.path.join(out, "law.json")):
            raise LawInputError(
                f"--out {out} is a non-empty directory without law.json; choose a new directory"
            )


def write_outputs(a: Analysis, out: str, table_rows: list[dict] | None = None) -> None:
    """Write law.json, report.md, the plots (and table.csv of the measurements when given)
    into ``out`` (module docstring): each file atomically, law.json last; outputs of an
    earlier fit_law run there that this one does not write are removed, nothing else."""
    check_out_dir(out)
    os.makedirs(out, exist_ok=True)
    stage = tempfile.mkdtemp(prefix="fit_law-")
    try:
        files = {"report.md": report_markdown(a).encode()}
        for name, plot in zip(plots_of(a), (plot_curves, plot_law, plot_validation)):
            path = os.path.join(stage, name)
            plot(a, path)
            files[name] = open(path, "rb").read()
        if table_rows is not None:
            write_table(table_rows, os.path.join(stage, "table.csv"))
            files["table.csv"] = open(os.path.join(stage, "table.csv"), "rb").read()
        doc = law_json(a)
        doc["outputs"] = sorted(files) + ["law.json"]
        files["law.json"] = (json.dumps(doc, indent=2) + "\n").encode()
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    earlier = _earlier_outputs(out)
    for name in [n for n in files if n != "law.json"] + ["law.json"]:
        atomic_write_bytes(os.path.join(out, name), files[name])
    for name in sorted(earlier - set(files)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))


def _earlier_outputs(out: str) -> set[str]:
    """The files an earlier fit_law run wrote into ``out`` (from its law.json)."""
    try:
        with open(os.path.join(out, "law.json")) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return set()
    names = doc.get("outputs") or (["report.md", "table.csv"] + list(doc.get("plots") or []))
    return {n for n in names if isinstance(n, str) and os.path.basename(n) == n}
