"""report.md of an analysis: the results first (the recommendation, the law, its validation,
the regime the ladder is in, the prediction), then the measurements and the method."""

from __future__ import annotations

from kis_megatron.law import collapse as collapse_mod
from kis_megatron.law import recommend as recommend_mod
from kis_megatron.law import select as select_mod
from kis_megatron.law.analysis import PASS_WITHIN, Analysis
from kis_megatron.law.collapse import COLLAPSE
from kis_megatron.law.regime import support_sentence

PLOTS = ("retention_curves.png", "law.png")
EXPOSURE_PLOT = "exposures.png"
VALIDATION_PLOT = "validation.png"


def plots_of(a: Analysis) -> list[str]:
    return (list(PLOTS) + ([EXPOSURE_PLOT] if a.regime.get("exposures_at_collapse") else [])
            + ([VALIDATION_PLOT] if a.validation else []))


def exposures_of(curve, point) -> float | None:
    """Mean exposures per fact at the collapse point (the trainer logs them per run)."""
    return curve.exposures_at(point.collapse_infusion) if point.status == COLLAPSE else None


def _g(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def _ci(ci) -> str:
    return "-" if not ci else f"[{_g(ci[0])}, {_g(ci[1])}]"


def _doc(module, after: str | None = None) -> str:
    text = module.__doc__
    return (text.split(after, 1)[1] if after else text).strip()


def report_markdown(a: Analysis) -> str:
    """The human report (module docstring)."""
    o = a.options
    lines = [
        "# Knowledge infusion scaling law",
        "",
        f"Metric `{o.metric}` against infusion (`{a.infusion_kind}`), "
        f"{len(a.curves)} retention curves, {len({c.model_params for c in a.curves})} model "
        f"sizes, {len({c.tokens for c in a.curves})} token budget(s).",
        "",
    ]
    for section in (_recommendation, _law, _validation, _regime, _prediction, _collapse_points,
                    _heldout, _method, _caveats):
        lines += section(a) + [""]
    lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots_of(a)], ""]
    return "\n".join(lines)


def _recommendation(a: Analysis) -> list[str]:
    r = a.recommendation
    lines = ["## Recommendation", ""]
    if not r:
        return lines + ["None requested (`--recommend N,D[,share]`)."]
    t = r["target"]
    share = f", domain share {t['share']:.3g}" if t["share"] is not None else ""
    pct = f"{100 * r['confidence']:g}%"
    unit = "facts" if a.infusion_kind == "domain_facts" else f"({a.infusion_kind})"
    lines.append(
        f"For a model of N={t['model_params']:.4g} parameters trained on D={t['tokens']:.4g} tokens"
        f"{share}: infuse **at most {r['facts']:,} {unit}** to keep predicted retention at or above "
        f"{r['q']:g} of its plateau with {pct} confidence (one-sided; central estimate "
        f"{r['facts_central']:.4g}, {pct} interval {_ci(r['interval'])}; form {r['form']}).")
    if r.get("exposures_per_fact"):
        extra = f"; {r['domain_tokens']:.4g} domain tokens" if r.get("domain_tokens") else ""
        lines.append(f"Equivalently: every fact rendered at least {r['exposures_per_fact']:.3g} times "
                     f"(the budget holds {r['renderings']:.4g} renderings{extra}).")
    lines.append("")
    if r["supported"]:
        lines.append("Supported: yes, the target lies inside the law's support (Regime below).")
    else:
        lines.append(f"**Supported: no.** {r['unsupported_because']}. Do not act on this number "
                     "without a validation at the target's scale.")
    return lines


def _law(a: Analysis) -> list[str]:
    sel, law = a.selection, a.law
    pct = f"{100 * law.confidence:g}%"
    f = sel.fits[sel.selected]
    lines = ["## Law", "",
             f"Selected form: **{sel.selected}**, {f.law.form_text()} (credible: "
             f"{', '.join(sel.credible)}; the rule is under Method)."]
    if sel.note:
        lines.append(f"Note: {sel.note}.")
    lines += ["", "| form | formula | parameters (" + pct + " intervals) | AICc | delta | held-out largest size | selectable |",
              "|---|---|---|---|---|---|---|"]
    for name, fit in sel.fits.items():
        if fit.law is None:
            lines.append(f"| {name} | - | not fitted: {fit.reason} | - | - | - | no |")
            continue
        params = fit.law.parameters()
        shown = ", ".join(f"{k} = {_g(v)} {_ci(params.get(k + '_ci'))}" for k, v in params.items()
                          if not k.endswith("_ci") and k not in ("N0", "D0"))
        if name == "floor" and a.accounting is not None and params["E_inf"] > 0:
            shown += f", CP_max = R / E_inf = {a.accounting.budget_scales[0] / params['E_inf']:.4g}"
        h = fit.heldout
        check = ("not possible" if not h.get("possible") else
                 "; ".join(f"{100 * p['rel_error']:+.0f}% ({'agrees' if p['inside'] else 'misses'})"
                           for p in h["points"]) or "-")
        lines.append(f"| {name}{' (selected)' if name == sel.selected else ''} | {fit.law.form_text()} | "
                     f"{shown} | {fit.aicc:.2f} | {fit.delta:+.2f} | {check} | "
                     f"{'yes' if fit.eligible else 'no (needs more sizes)'} |")
    lines += ["", f"The paper's law, CP = a N^b{' D^c' if law.use_tokens else ''}: a = {law.coefficient:.4g} "
              f"{_ci(law.coefficient_ci())}, b = {law.exponent:.4g} {_ci(law.coef_ci(1))}"
              + (f", c = {law.tokens_exponent:.4g} {_ci(law.coef_ci(2))}" if law.use_tokens else "")
              + f"; RMS residual of the collapse points about it {law.rms_log10_residual:.3g} decades."]
    if law.note:
        lines.append(f"Note: {law.note}.")
    return lines


def _comparison_table(checks: list[dict]) -> list[str]:
    lines = ["", "| N | D | measured | measured CI | predicted | predicted interval | rel. error | agree |",
             "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        if c["measured"] is None:
            measured, err = f"bound {_g(c.get('measured_bound'))}", "-"
        else:
            measured, err = f"{c['measured']:.4g}", f"{100 * c['rel_error']:+.1f}%"
        lines.append(
            f"| {c['model_params']:.4g} | {c['tokens']:.4g} | {measured} | {_ci(c['measured_ci'])} | "
            f"{c['predicted']:.4g} | {_ci(c['interval'])} | {err} | {'yes' if c['inside'] else 'no'} |")
    return lines


def _validation(a: Analysis) -> list[str]:
    v = a.validation
    lines = ["## Validation on a larger model", ""]
    if not v:
        return lines + ["None: no validation runs were given (`fit_law.py --validation-runs DIR`; the "
                        "runs come from `tools/sweep.py SWEEP --validate law.json`)."]
    pct = f"{100 * a.options.confidence:g}%"
    lines.append(f"The law fitted on the ladder (the validation runs are not part of the fit), in its "
                 f"selected form {v['form']}, predicts the collapse point of a model "
                 f"{v['extrapolation']:.3g}x larger than its largest size; {v['runs']} runs of that model "
                 f"at {len(v['levels'])} levels ({', '.join(f'{x:.4g}' for x in v['levels'])}) measure it "
                 "with the same detector.")
    lines += _comparison_table([v])
    lines.append("")
    if v["measured"] is None:
        lines.append(f"**Not measured**: {v['note']}.")
    else:
        verdict = "**passed**" if v["passed"] else "**failed**"
        lines.append(
            f"Measured {v['measured']:.4g} against predicted {v['predicted']:.4g}: "
            f"{100 * v['rel_error']:+.1f}% relative error; the two "
            f"{'agree' if v['inside'] else 'disagree'} within the {pct} interval of their difference "
            f"(the measured point is {'inside' if v['inside_prediction_interval'] else 'outside'} the "
            f"prediction interval itself). Validation {verdict} (within {100 * PASS_WITHIN:g}% and agreeing).")
    if v.get("seeds"):
        shown = ", ".join(f"seed {s['seed']:g}: {_g(s['collapse_infusion'])} {_ci(s['ci'])}" for s in v["seeds"])
        spread = v.get("seed_spread_log10")
        lines += ["", f"Per seed: {shown}" + (f"; spread (sd) {spread:.3f} decades, a factor "
                                              f"{10 ** spread:.2f} per seed." if spread else ".")
                  + " The measured point pools the seeds at every level, and its interval carries "
                  "their spread (the run-to-run spread on the logit)."]
    return lines


def _regime(a: Analysis) -> list[str]:
    lines = ["## Regime", ""]
    ex = a.regime.get("exposures_at_collapse")
    if ex:
        lines += ["Exposures per fact at the collapse point, E* = R / CP (R: the renderings of the "
                  "infused set the budget holds):", "",
                  "| N | D | E* | interval | R |", "|---|---|---|---|---|"]
        lines += [f"| {e['model_params']:.4g} | {e['tokens']:.4g} | {e['exposures']:.3g} | "
                  f"{_ci(e['interval'])} | {e['renderings']:.4g} |" for e in ex]
        v = a.validation
        if v and v.get("exposures_at_collapse"):
            lines.append(f"| {v['model_params']:.4g} (validation) | {v['tokens']:.4g} | "
                         f"{v['exposures_at_collapse']:.3g} | - | - |")
        t = a.regime.get("top_slope", {})
        lines.append("")
        if t.get("possible"):
            n1, n2 = t["between"]
            state = ("still fall at the top of the ladder" if t["still_falling"] else
                     "no longer fall measurably at the top of the ladder: the ladder cannot tell its "
                     "top from a floor")
            lines.append(f"Between N={n1:.3g} and N={n2:.3g}, E* changes as N^{t['slope']:.2f} "
                         f"({100 * a.options.confidence:g}% interval {_ci(t['interval'])}): the needed "
                         f"exposures {state}.")
        else:
            lines.append(f"Top-of-ladder test: {t.get('reason', 'not possible')}.")
    else:
        why = a.selection.fits.get("floor")
        lines.append("Exposures at collapse are not known for this study"
                     + (f" ({why.reason})" if why is not None and why.reason else "") + ".")
    lines += ["", support_sentence(a.regime["support"])]
    return lines


def _prediction(a: Analysis) -> list[str]:
    lines = ["## Prediction", ""]
    pr = a.prediction
    if not pr:
        return lines + ["None requested (`--predict N[,D]`)."]
    d = f", D={pr['tokens']:.4g}" if pr["tokens"] else ""
    lines.append(f"N={pr['model_params']:.4g}{d}: collapse infusion {pr['collapse_infusion']:.4g} "
                 f"({pr['form']}), {100 * pr['confidence']:g}% interval {_ci(pr['interval'])} "
                 f"(spanning {', '.join(pr['per_form'])})."
                 + (f" Note: {pr['note']}." if pr["note"] else ""))
    if not pr["supported"]:
        lines.append(f"**Not supported**: {pr['unsupported_because']}.")
    lines.append("A collapse point is where retention has already halved; how much to infuse is "
                 "the Recommendation.")
    return lines


def _collapse_points(a: Analysis) -> list[str]:
    lines = ["## Collapse points", "",
             "| N | D | status | collapse infusion | CI | bound | plateau | floor | threshold | "
             "exposures per fact at collapse |", "|---|---|---|---|---|---|---|---|---|---|"]
    outside, bounds = [], []
    for c, p in zip(a.curves, a.points):
        bound = p.lower_bound if p.lower_bound is not None else p.upper_bound
        f = p.fit
        flag = ""
        if p.status == COLLAPSE and not p.ci[0] <= p.collapse_infusion <= p.ci[1]:
            flag = " (outside its CI)"
            outside.append(p)
        if p.status != COLLAPSE:
            bounds.append(p)
        lines.append(
            f"| {p.model_params:.4g} | {p.tokens:.4g} | {p.status} | {_g(p.collapse_infusion)}{flag} | "
            f"{_ci(p.ci)} | {_g(bound)} | {_g(f and f.plateau)} | {_g(f and f.floor)} | "
            f"{_g(p.threshold)} | {_g(exposures_of(c, p))} |")
    spread = next((p.spread for p in a.points if p.spread is not None), None)
    if spread is not None:
        lines += ["", f"Run-to-run spread of the accuracies (pooled over the curves): {spread:.3g} "
                  "on the logit scale, beyond the probes' binomial noise; the intervals carry it."]
    if outside:
        lines += ["", f"{len(outside)} collapse point(s) lie outside their own percentile interval: "
                  "the bootstrap replicates fall mostly on one side of the fit (a skewed or "
                  "bimodal fall, often too few levels on the slope); more levels on the fall "
                  "(`tools/sweep.py --refine`) usually mend it."]
    if bounds:
        lines += ["", "Excluded from the fit (bounds, not located collapse points):", ""]
        lines += [f"- N={p.model_params:.4g}, D={p.tokens:.4g}: {p.status}: {p.note}" for p in bounds]
    return lines


def _heldout(a: Analysis) -> list[str]:
    lines = ["## Held-out check (the largest size left out)", ""]
    for name, f in a.selection.fits.items():
        h = f.heldout
        if f.law is None:
            continue
        if not h.get("possible"):
            lines.append(f"- {name}: not possible: {h.get('reason')}.")
            continue
        lines.append(f"- {name}, refitted without N={h['held_out_model_params']:.4g}:")
        lines += _comparison_table(h["points"]) + [""]
    return lines


def _method(a: Analysis) -> list[str]:
    o, law = a.options, a.law
    pct = f"{100 * o.confidence:g}%"
    return [
        "## Method", "",
        "### Collapse points", "",
        _doc(collapse_mod, "Method (the one this project documents and reports):"), "",
        f"Settings: fraction {o.fraction:g}, chance {o.chance if o.chance is not None else 'free floor'}, "
        f"min_drop {o.min_drop:g}, ceiling {o.ceiling if o.ceiling is not None else 'none'}, "
        f"{o.n_boot} bootstrap replicates (seed {o.seed}), {pct} percentile intervals.", "",
        "### The law", "",
        ("Every form is fitted jointly: all located curves at once, each curve's collapse point on "
         "the law and its plateau and width its own (`kis_megatron/law/joint.py`); intervals from "
         "refitting the whole problem on bootstrap replicates of the measurements."
         if law.method == "joint" else
         f"The law {law.form_text()} is fitted by least squares in log10 space to the located "
         "collapse points (two-stage fit), its intervals from every bootstrap replicate of the "
         "collapse points; the exposure forms need the joint fit."), "",
        "### Selecting the form", "",
        _doc(select_mod, "The rule").split("\n", 1)[1].strip(), "",
        "### The recommendation", "",
        _doc(recommend_mod), "",
    ]


def _caveats(a: Analysis) -> list[str]:
    located = [p for p in a.points if p.status == COLLAPSE]
    n_sizes = len({p.model_params for p in located})
    lines = ["## Caveats", ""]
    if n_sizes < 5:
        lines.append(f"- {n_sizes} model sizes carry the law: a form with a bend has almost as many "
                     "parameters as there are sizes, and the ladder can rarely tell a floor just "
                     "beyond its largest size from a power law (which is why the interval spans "
                     "the forms).")
    lines += ["- A collapse point depends on the chosen fraction and floor; compare laws only at "
              "equal settings.",
              "- Exposures per fact assume the target renders its facts as the ladder did (the same "
              "templates, tokenizer and sequence length): the tokens per rendering are the ladder's."]
    bounds = [p for p in a.points if p.status != COLLAPSE]
    if bounds:
        lines.append(f"- {len(bounds)} curve(s) gave only a bound and were left out of the fit.")
    return lines
