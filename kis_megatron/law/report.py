"""law.json, report.md and the plots of an analysis, written as one output directory that
appears complete or not at all: everything goes to a temporary sibling directory that is
renamed into place."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile

from kis_megatron.law import collapse as collapse_mod
from kis_megatron.law.analysis import Analysis
from kis_megatron.law.collapse import COLLAPSE
from kis_megatron.law.plots import plot_curves, plot_law
from kis_megatron.law.table import LawInputError, write_table

PLOTS = ("retention_curves.png", "law.png")


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
        "collapse_points": [p.to_json() | {"used_in_fit": p.status == COLLAPSE} for p in a.points],
        "prediction": a.prediction,
        "heldout": a.heldout,
        "metric": o.metric,
        "infusion_kind": a.infusion_kind,
        "n_points": len(law.points),
        "model_sizes": sorted({p.model_params for p in law.points}),
        "token_budgets": sorted({p.tokens for p in law.points}),
        "rms_log10_residual": law.rms_log10_residual,
        "method": {
            "collapse": "smooth step in log10(infusion) after the plateau start; collapse where "
            "retention above the floor falls to `fraction` of the plateau; residual bootstrap",
            "law": "least squares in log10 space; pipeline bootstrap over curve replicates",
            "fraction": o.fraction,
            "chance": o.chance,
            "min_drop": o.min_drop,
            "bootstrap": o.n_boot,
            "bootstrap_dropped": law.dropped_replicates,
            "seed": o.seed,
            "confidence": o.confidence,
        },
        "sources": a.sources,
        "plots": list(PLOTS),
    })


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
        f"min_drop {o.min_drop:g}, {o.n_boot} bootstrap replicates (seed {o.seed}), "
        f"{pct} percentile intervals.",
        "",
        f"The law {law.form()} is fitted by least squares in log10 space to the located "
        "collapse points; its intervals come from refitting it on every bootstrap replicate "
        "of all collapse points together.",
        "",
        "## Collapse points",
        "",
        "| N | D | status | collapse infusion | CI | bound | plateau | floor | threshold |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in a.points:
        bound = p.lower_bound if p.lower_bound is not None else p.upper_bound
        f = p.fit
        lines.append(
            f"| {p.model_params:.4g} | {p.tokens:.4g} | {p.status} | {_g(p.collapse_infusion)} | "
            f"{_ci(p.ci)} | {_g(bound)} | {_g(f and f.plateau)} | {_g(f and f.floor)} | "
            f"{_g(p.threshold)} |"
        )
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
    lines += [f"- RMS residual in log10: {law.rms_log10_residual:.3g}", "", "## Held-out check", ""]
    h = a.heldout
    if not h.get("possible"):
        lines.append(f"Not possible: {h['reason']}.")
    else:
        lines.append(f"Law refitted without N={h['held_out_model_params']:.4g} "
                     f"(exponent then {h['exponent_without_largest']:.4g}):")
        lines.append("")
        lines.append("| D | measured | measured CI | predicted | predicted interval | rel. error | in interval |")
        lines.append("|---|---|---|---|---|---|---|")
        for c in h["points"]:
            lines.append(
                f"| {c['tokens']:.4g} | {c['measured']:.4g} | {_ci(c['measured_ci'])} | "
                f"{c['predicted']:.4g} | {_ci(c['predicted_interval'])} | "
                f"{100 * c['relative_error']:+.1f}% | {'yes' if c['measured_in_interval'] else 'no'} |"
            )
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
    lines += ["", "## Plots", "", *[f"![{p}]({p})" for p in PLOTS], ""]
    return "\n".join(lines)


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
    into ``out``, replacing an earlier fit_law output there, atomically as a whole."""
    check_out_dir(out)
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(out) + ".tmp-")
    try:
        with open(os.path.join(tmp, "law.json"), "w") as f:
            json.dump(law_json(a), f, indent=2)
            f.write("\n")
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(report_markdown(a))
        plot_curves(a, os.path.join(tmp, PLOTS[0]))
        plot_law(a, os.path.join(tmp, PLOTS[1]))
        if table_rows is not None:
            write_table(table_rows, os.path.join(tmp, "table.csv"))
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
