"""The outputs of an analysis: law.json (its content here, its reader in lawfile.py),
report.md (report.py) and the plots (plots.py).  Every file is written under a
temporary name and renamed into place, law.json last (it lists the others, so a reader that
finds law.json finds its files); files of an earlier fit_law output that this one does not
write again are removed, and nothing else in the directory is touched."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile

from kis_megatron.law.analysis import Analysis
from kis_megatron.law.collapse import COLLAPSE
from kis_megatron.law.lawfile import LAW_FILE, earlier_outputs, holds_law, law_bytes
from kis_megatron.law.plots import plot_curves, plot_exposures, plot_law, plot_validation
from kis_megatron.law.regime import support_sentence
from kis_megatron.law.report import exposures_of, plots_of, report_markdown
from kis_megatron.law.table import LawInputError, write_table
from kis_megatron.utils import atomic_write_bytes



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
    """The law.json content (DESIGN.md keys first: the paper's power law's coefficient and
    exponent, then the selected form, the recommendation, the validation, the regime)."""
    law, o, sel = a.law, a.options, a.selection
    return _clean({
        "coefficient": law.coefficient,
        "coefficient_ci": list(law.coefficient_ci()),
        "exponent": law.exponent,
        "exponent_ci": list(law.coef_ci(1)),
        "tokens_exponent": law.tokens_exponent,
        "tokens_exponent_ci": list(law.coef_ci(2)) if law.use_tokens else None,
        "form": law.form_text(),
        "law_note": law.note or None,
        "selected_form": sel.selected,
        "selection": {"credible": sel.credible, "note": sel.note or None,
                      "rule": "kis_megatron/law/select.py (module docstring)"},
        "forms": {name: _form_json(a, f) for name, f in sel.fits.items()},
        "recommendation": a.recommendation,
        "validation": a.validation,
        "prediction": a.prediction,
        "regime": a.regime | {"sentence": support_sentence(a.regime["support"])},
        "exposure_accounting": a.accounting.to_json() if a.accounting else None,
        "collapse_points": [p.to_json() | {"used_in_fit": p.status == COLLAPSE,
                                           "exposures_at_collapse": exposures_of(c, p)}
                            for c, p in zip(a.curves, a.points)],
        "heldout": a.heldout,
        "metric": o.metric,
        "infusion_kind": a.infusion_kind,
        "n_points": len(law.points),
        "model_sizes": sorted({p.model_params for p in law.points}),
        "token_budgets": sorted({p.tokens for p in law.points}),
        "rms_log10_residual": law.rms_log10_residual,
        "method": {
            "fit": law.method,
            "collapse": "smooth step in log10(infusion) after the plateau start; collapse where "
            "retention above the floor falls to `fraction` of the plateau; parametric bootstrap "
            "with the pooled run-to-run spread",
            "law": LAW_METHOD[law.method],
            "fraction": o.fraction,
            "chance": o.chance,
            "min_drop": o.min_drop,
            "ceiling": o.ceiling,
            "bootstrap": o.n_boot,
            "bootstrap_dropped": law.dropped_replicates,
            "seed": o.seed,
            "confidence": o.confidence,
            "retain": o.retain,
            "run_spread_logit": next((p.spread for p in a.points if p.spread is not None), None),
        },
        "sources": a.sources,
        "plots": plots_of(a),
    })


def _form_json(a: Analysis, f) -> dict:
    out = {"fitted": f.law is not None, "reason": f.reason or None}
    if f.law is None:
        return out
    params = f.law.parameters()
    if f.name == "floor" and a.accounting is not None:
        # the saturated collapse point CP_max = R / E_inf at the ladder's (first) budget
        r = a.accounting.budget_scales[0]
        e, (lo, hi) = params["E_inf"], params["E_inf_ci"]
        params["CP_max"] = r / e if e > 0 else None
        params["CP_max_ci"] = [r / hi if hi > 0 else None, r / lo if lo > 0 else None]
        params["CP_max_at_renderings"] = r
    return out | {
        "formula": f.law.form_text(), "parameters": params, "aicc": f.aicc,
        "delta_aicc": f.delta, "eligible": f.eligible, "credible": f.credible,
        "heldout": f.heldout, "rms_log10_residual": f.law.rms_log10_residual,
        "state": f.law.form.state(f.law.coef),
    }


LAW_METHOD = {
    "joint": "all located curves fitted at once, each curve's collapse point on the law, each "
    "curve's plateau and width its own; bootstrap over measurements (runs resampled within "
    "levels when repeated, else wild), the whole fit repeated per replicate",
    "two-stage": "least squares in log10 space through the per-curve collapse points; "
    "pipeline bootstrap over curve replicates",
}


def _plotters(a: Analysis):
    return ([plot_curves, plot_law] + ([plot_exposures] if a.regime.get("exposures_at_collapse") else [])
            + ([plot_validation] if a.validation else []))


def check_out_dir(out: str) -> None:
    """Refuse to overwrite a directory that is not an earlier fit_law output."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise LawInputError(f"--out {out} exists and is not a directory")
        if os.listdir(out) and not holds_law(out):
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
        for name, plot in zip(plots_of(a), _plotters(a)):
            path = os.path.join(stage, name)
            plot(a, path)
            files[name] = open(path, "rb").read()
        if table_rows is not None:
            write_table(table_rows, os.path.join(stage, "table.csv"))
            files["table.csv"] = open(os.path.join(stage, "table.csv"), "rb").read()
        files[LAW_FILE] = law_bytes(law_json(a), list(files))
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    earlier = earlier_outputs(out)
    for name in [n for n in files if n != LAW_FILE] + [LAW_FILE]:
        atomic_write_bytes(os.path.join(out, name), files[name])
    for name in sorted(earlier - set(files)):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
