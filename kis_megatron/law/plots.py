"""PNG plots of a law analysis: the retention curves with their fitted steps and collapse
points, and the law in log-log with its band, the held-out check and the prediction.
Uses matplotlib's Agg canvas directly, so no global backend is set for the caller."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from kis_megatron.law.analysis import Analysis
from kis_megatron.law.collapse import COLLAPSE


def _colors(values):
    vals = sorted(set(values))
    cmap = colormaps["viridis"]
    return {v: cmap(0.85 * i / max(len(vals) - 1, 1)) for i, v in enumerate(vals)}


def _bar(value: float, lo: float, hi: float) -> list[list[float]]:
    """Error-bar lengths [[below], [above]] of an interval around ``value``; a value outside
    its own percentile interval (possible with a percentile bootstrap) gets a zero-length
    side rather than a negative one (the report flags such points)."""
    return [[max(value - lo, 0.0)], [max(hi - value, 0.0)]]


def _save(fig: Figure, path: str) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)


def plot_curves(a: Analysis, path: str) -> None:
    """One panel per token budget: measured retention vs infusion for each size (points),
    the fitted step (line, over the fitted range), collapse points with their CI as a
    horizontal bar at the threshold, bounds as arrows."""
    budgets = sorted({c.tokens for c in a.curves})
    ncol = min(3, len(budgets))
    nrow = -(-len(budgets) // ncol)
    fig = Figure(figsize=(max(6.4, 5.2 * ncol), 4.2 * nrow), layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    color = _colors(c.model_params for c in a.curves)
    for ax, d in zip(axes, budgets):
        for c, p in zip(a.curves, a.points):
            if c.tokens != d:
                continue
            col = color[c.model_params]
            ax.plot(c.infusion, c.value, "o", color=col, ms=4, alpha=0.7,
                    label=f"N={c.model_params:.3g}")
            if p.fit is not None:
                grid = np.geomspace(*p.fit_range, 200)
                ax.plot(grid, p.fit(grid), "-", color=col, lw=1.5)
            y_mark = p.threshold if p.threshold is not None else float(np.median(c.value))
            if p.status == COLLAPSE:
                lo, hi = p.ci
                x = p.collapse_infusion
                ax.errorbar([x], [y_mark], xerr=_bar(x, lo, hi), fmt="D", color=col,
                            mec="k", ms=7, capsize=3)
            elif p.lower_bound is not None:
                ax.plot([p.lower_bound], [y_mark], ">", color=col, mec="k", ms=9)
            elif p.upper_bound is not None:
                ax.plot([p.upper_bound], [y_mark], "<", color=col, mec="k", ms=9)
        if a.options.chance is not None:
            ax.axhline(a.options.chance, color="gray", ls=":", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel(f"infusion ({a.infusion_kind})")
        ax.set_ylabel(a.options.metric)
        ax.set_title(f"D = {d:.3g} tokens")
        ax.legend(fontsize=7)
    for ax in axes[len(budgets):]:
        ax.set_visible(False)
    fig.suptitle("lines: fitted steps; diamonds: collapse points with CI; "
                 "arrows: lower (>) / upper (<) bounds", fontsize=9)
    _save(fig, path)


def _form_band(a: Analysis, name: str, grid: np.ndarray, d: float | None):
    """A credible form's prediction and interval over sizes ``grid`` at budget ``d``."""
    law = a.selection.fits[name].law
    budget = d if d is not None else a.selection.ladder_budget()
    k = a.selection.scale(budget)
    return law.predict(grid, d if law.use_tokens else None, k)


def plot_law(a: Analysis, path: str) -> None:
    """Collapse point vs model size in log-log: located points with CI bars, bounds as
    arrows, every credible form with its bootstrap band (the selected one solid, one line
    per budget when it has a D term), the paper's power law dashed when it is not credible,
    the held-out prediction of the selected form, the validation and the prediction."""
    sel = a.selection
    fig = Figure(figsize=(6.4, 4.8), layout="constrained")
    ax = fig.subplots()
    sizes = [p.model_params for p in a.points]
    n_hi = max(sizes + ([a.prediction["model_params"]] if a.prediction else [])
               + ([a.validation["model_params"]] if a.validation else []))
    grid = np.geomspace(min(sizes) / 1.5, n_hi * 1.5, 100)
    law = sel.law
    budgets = sorted({p.tokens for p in law.points}) if law.use_tokens else [None]
    color = _colors(budgets) if law.use_tokens else {None: "C0"}
    shown = list(sel.credible) + ([] if "power" in sel.credible else ["power"])
    for j, name in enumerate(shown):
        for d in budgets:
            pred, lo, hi = _form_band(a, name, grid, d)
            style = "-" if name == sel.selected else ("--" if name in sel.credible else ":")
            label = f"{name}{' (selected)' if name == sel.selected else ''}" + (f" at D={d:.3g}" if d else "")
            col = color[d] if name == sel.selected else f"C{j + 3}"
            ax.plot(grid, pred, style, color=col, label=label)
            if name in sel.credible:
                ax.fill_between(grid, lo, hi, color=col, alpha=0.15, lw=0)
    labelled = False
    for p in a.points:
        col = color[p.tokens] if law.use_tokens and p.tokens in color else "k"
        if p.status == COLLAPSE:
            x, y = p.model_params, p.collapse_infusion
            ax.errorbar([x], [y], yerr=_bar(y, *p.ci), fmt="o", color=col,
                        capsize=3, label=None if labelled else "collapse points")
            labelled = True
        elif p.lower_bound is not None:
            ax.plot([p.model_params], [p.lower_bound], "^", color=col, mfc="none", ms=9)
        elif p.upper_bound is not None:
            ax.plot([p.model_params], [p.upper_bound], "v", color=col, mfc="none", ms=9)
    h = sel.fits[sel.selected].heldout
    if h.get("possible"):
        for i, c in enumerate(h["points"]):
            x = c["model_params"] * 1.06  # nudged right so it does not hide the data point
            y, (lo, hi) = c["predicted"], c["interval"]
            ax.errorbar([x], [y], yerr=_bar(y, lo, hi), fmt="s", color="C3", mfc="none",
                        capsize=3, label="held-out prediction" if i == 0 else None)
    if a.prediction:
        pr = a.prediction
        y, (lo, hi) = pr["collapse_infusion"], pr["interval"]
        ax.errorbar([pr["model_params"]], [y], yerr=_bar(y, lo, hi), fmt="*", ms=12,
                    color="C1", capsize=3, label="prediction")
    v = a.validation
    if v:
        x = v["model_params"]
        ax.errorbar([x * 1.06], [v["predicted"]], yerr=_bar(v["predicted"], *v["interval"]), fmt="s",
                    color="C3", capsize=3, label="validation: predicted")
        if v["measured"] is not None:
            ax.errorbar([x], [v["measured"]], yerr=_bar(v["measured"], *v["measured_ci"]), fmt="o",
                        color="C2", mec="k", capsize=3, label="validation: measured")
        elif v.get("measured_bound") is not None:
            ax.plot([x], [v["measured_bound"]], "^" if v["status"] != "collapsed_at_start_upper_bound" else "v",
                    color="C2", mec="k", ms=9, label="validation: bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters N")
    ax.set_ylabel(f"collapse infusion ({a.infusion_kind})")
    ax.set_title(f"selected: {sel.selected}; paper's power law b = {a.law.exponent:.3g} "
                 f"[{a.law.coef_ci(1)[0]:.3g}, {a.law.coef_ci(1)[1]:.3g}]", fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_exposures(a: Analysis, path: str) -> None:
    """Exposures per fact at the collapse point against N (log-log) with their intervals, the
    credible forms' E*(N) with bands, and the validation's measured E*: where the points stop
    falling, the paper's law no longer extrapolates."""
    sel, acc = a.selection, a.accounting
    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    ex = a.regime["exposures_at_collapse"]
    budgets = sorted({e["tokens"] for e in ex})
    color = _colors(budgets)
    n_hi = max([e["model_params"] for e in ex] + ([a.validation["model_params"]] if a.validation else []))
    grid = np.geomspace(min(e["model_params"] for e in ex) / 1.5, n_hi * 1.5, 100)
    for j, name in enumerate(sel.credible):
        for d in budgets:
            k = acc.scale_for(d)
            pred, lo, hi = _form_band(a, name, grid, d)
            style = "-" if name == sel.selected else "--"
            ax.plot(grid, k / pred, style, color=f"C{j}", label=f"{name}" + (f" at D={d:.3g}" if len(budgets) > 1 else ""))
            ax.fill_between(grid, k / hi, k / lo, color=f"C{j}", alpha=0.15, lw=0)
    for e in ex:
        y, (lo, hi) = e["exposures"], e["interval"]
        ax.errorbar([e["model_params"]], [y], yerr=_bar(y, lo, hi), fmt="o", color=color[e["tokens"]],
                    mec="k", capsize=3)
    v = a.validation
    if v and v.get("measured") is not None and a.accounting is not None:
        k = acc.scale_for(v["tokens"])
        lo, hi = v["measured_ci"]
        ax.errorbar([v["model_params"]], [k / v["measured"]], yerr=_bar(k / v["measured"], k / hi, k / lo),
                    fmt="D", color="C2", mec="k", capsize=3, label="validation: measured")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("model parameters N")
    ax.set_ylabel("exposures per fact at collapse, E* = R / CP")
    t = a.regime.get("top_slope", {})
    title = (f"top of the ladder: E* ~ N^{t['slope']:.2f} [{t['interval'][0]:.2f}, {t['interval'][1]:.2f}]"
             if t.get("possible") else "exposures at collapse")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_validation(a: Analysis, path: str) -> None:
    """The validation model's measured retention curve (points, fitted step, located
    collapse point with its CI) against the law's prediction for it (line and band)."""
    v, c, p = a.validation, a.validation_curve, a.validation_point
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    lo, hi = v["interval"]
    ax.axvspan(lo, hi, color="C3", alpha=0.15, lw=0, label=f"predicted interval [{lo:.3g}, {hi:.3g}]")
    ax.axvline(v["predicted"], color="C3", ls="--", lw=1.5, label=f"predicted {v['predicted']:.3g}")
    ax.plot(c.infusion, c.value, "o", color="C0", ms=5, label=f"measured, N={c.model_params:.3g}")
    if p.fit is not None:
        grid = np.geomspace(*p.fit_range, 200)
        ax.plot(grid, p.fit(grid), "-", color="C0", lw=1.5)
    if p.status == COLLAPSE:
        ax.errorbar([p.collapse_infusion], [p.threshold], xerr=_bar(p.collapse_infusion, *p.ci),
                    fmt="D", color="C2", mec="k", ms=7, capsize=3,
                    label=f"measured collapse {p.collapse_infusion:.3g}")
    if a.options.chance is not None:
        ax.axhline(a.options.chance, color="gray", ls=":", lw=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel(f"infusion ({a.infusion_kind})")
    ax.set_ylabel(a.options.metric)
    verdict = ("not located" if v["measured"] is None else
               f"error {100 * v['rel_error']:+.0f}%, {'inside' if v['inside'] else 'outside'} the interval")
    ax.set_title(f"validation at N={c.model_params:.3g} ({v['extrapolation']:.2g}x the largest fitted): {verdict}",
                 fontsize=9)
    ax.legend(fontsize=7)
    _save(fig, path)
