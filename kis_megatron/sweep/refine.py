"""Refinement of a sweep: more infusion levels where each retention curve's collapse point is
least known (the ``refine:`` section, see the package docstring).

One planning step (``plan_refinement``) reads the finished runs' final evaluations
(law.runs.extract_runs), groups them into curves by their sweep points (every axis but the
refined one and the seed axis), locates each curve's collapse as fit_law does
(law.analysis.locate: fraction 0.5, min_drop 0.1, 1000 bootstrap replicates, one stream per
curve in fit_law's order, the validation curve's stream as fit_law --validation-runs gives
it; the overdispersion is pooled over the curves planned together, where fit_law pools the
ladder's and the validation's, so a validation interval can differ slightly), and asks
law.refine.next_level for one more level.  A curve is
planned only when all of its runs have finished.  Each proposal becomes one new run per seed,
recorded in ``<out>/refine.json`` (round, curve, value, runs); ``max_runs`` caps the runs
added in all, and a round's proposals are taken in the sweep's curve order while they fit.

A proposal whose run cannot be built (its config is invalid, or its id clashes) is reported
and that curve is not refined further; a curve with fewer than 4 measured levels (what
fit_law needs) or with unreadable logs is reported and left alone.  Everything depends only
on the finished runs, so the same results give the same levels, and a rerun resumes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from kis_megatron.config import ConfigError
from kis_megatron.law.analysis import VALIDATION_STREAM, Options, locate, logged_chance
from kis_megatron.law.collapse import AT_START, COLLAPSE, PLATEAU_UNOBSERVED, CollapsePoint
from kis_megatron.law.refine import interval_width, next_level
from kis_megatron.law.runs import extract_runs
from kis_megatron.law.table import Curve, LawInputError, select_curves
from kis_megatron.sweep.grid import PLAN_FILE, REFINE_FILE, Sweep, SweepRun, refine_runs, refined_points
from kis_megatron.sweep.launch import run_local
from kis_megatron.sweep.spec import Point
from kis_megatron.sweep.status import run_status
from kis_megatron.utils import atomic_write_json

MIN_LEVELS = 4  # distinct levels a curve needs, as law.table.select_curves requires


@dataclass
class CurveState:
    """One curve in one planning step: its runs and what the step concluded."""

    label: str
    points: dict[str, Point]  # the curve's point on every axis but the refined and seed axes
    runs: list[SweepRun]
    status: str = ""  # waiting | unreadable | few_levels | done | budget | stopped | added
    note: str = ""
    curve: Curve | None = None
    collapse: CollapsePoint | None = None
    width: float | None = None  # the collapse CI in decades, when located
    level: float | None = None  # the proposed level
    new_runs: list[SweepRun] = field(default_factory=list)


@dataclass
class RefineStep:
    round: int
    curves: list[CurveState]
    new_runs: list[SweepRun]


def curves_of(sweep: Sweep) -> list[CurveState]:
    """The sweep's runs grouped into curves, in the order they first appear."""
    spec = sweep.refine
    groups: dict[tuple, CurveState] = {}
    for run in sweep.runs:
        points = {a: p for a, p in run.points.items() if a not in (spec.axis, spec.seed_axis)}
        key = tuple((a, p.name) for a, p in points.items())
        if key not in groups:
            label = "-".join(p.name for p in points.values()) or "(all runs)"
            groups[key] = CurveState(label, points, [])
        groups[key].runs.append(run)
    return list(groups.values())


def _read_curve(state: CurveState, metric: str) -> list[dict] | None:
    """Rows of the curve's finished runs (every metric, for chance: auto), or None with the
    state set when the curve cannot be planned yet."""
    unfinished = [f"{r.run_id} ({s})" for r in state.runs if (s := run_status(r)) != "finished"]
    if unfinished:
        state.status = "waiting"
        shown = ", ".join(unfinished[:3]) + (f" and {len(unfinished) - 3} more" if len(unfinished) > 3 else "")
        state.note = f"waiting for {len(unfinished)} unfinished run(s): {shown}"
        return None
    try:
        rows, _ = extract_runs([str(r.run_dir) for r in state.runs])
    except LawInputError as e:
        state.status, state.note = "unreadable", f"not refined: {e}"
        return None
    sel = [r for r in rows if r["metric"] == metric]
    bad = [r["run_id"] for r in sel if not math.isfinite(r["value"])]
    budgets = {(r["model_params"], r["tokens"]) for r in sel}
    missing = {r.run_id for r in state.runs} - {r["run_id"] for r in sel}
    if missing or bad or len(budgets) != 1:
        why = (f"no final {metric} in {', '.join(sorted(missing))}" if missing else
               f"{metric} is NaN or infinite in {', '.join(bad)}" if bad else
               "its runs differ in model size or token budget")
        state.status, state.note = "unreadable", f"not refined: {why}"
        return None
    x = np.array([r["infusion"] for r in sel], dtype=float)
    if np.unique(x).size < MIN_LEVELS:
        (n, d), = budgets
        order = np.argsort(x, kind="stable")
        state.curve = Curve(float(n), float(d), x[order], np.array([r["value"] for r in sel])[order])
        state.status = "few_levels"
        state.note = (f"not refined: {np.unique(x).size} level(s) measured, a collapse curve needs "
                      f"{MIN_LEVELS}; add values to the axis")
    else:  # the curve as fit_law reads it: probe counts, exposures, seeds
        (state.curve,), _ = select_curves(sel, metric, min_sizes=1)
    return rows


def _describe(state: CurveState) -> str:
    p = state.collapse
    if p is None:
        return state.note
    if p.status == COLLAPSE:
        where = (f"collapse {p.collapse_infusion:.4g} [{p.ci[0]:.4g}, {p.ci[1]:.4g}], "
                 f"CI {state.width:.3g} decades")
    elif p.status == AT_START:
        where = f"collapsed at or below {p.upper_bound:.4g} (no CI)"
    elif p.status == PLATEAU_UNOBSERVED:
        where = f"plateau not measured: collapse at or below {p.upper_bound:.4g} (no CI)"
    else:
        where = f"no collapse located up to {p.lower_bound:.4g} (no CI)"
    if state.status == "added":
        ids = ", ".join(r.run_id for r in state.new_runs)
        return f"{where} -> new level {state.level:g} ({ids})"
    return f"{where}; {state.note}"


def _ladder_plateau(sweep: Sweep) -> float | None:
    """The ladder's plateau that a validation curve is checked against (collapse.py step 5),
    from the law its plan was made from (law.json ``regime.ladder_plateau``)."""
    try:
        plan = json.loads((sweep.out / PLAN_FILE).read_text())
        law = json.loads(open(plan["law"]).read())
        return float(law["regime"]["ladder_plateau"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_refinement(sweep: Sweep, *, n_boot: int = 1000, log=print) -> RefineStep:
    """One planning step: propose a level for every curve whose runs have all finished,
    add the new runs to ``sweep.runs`` and record them in ``<out>/refine.json``."""
    spec = sweep.refine
    if spec is None:
        raise ConfigError(f"{sweep.path}: refinement needs a refine: section")
    records = refined_points(sweep)
    rnd = max((e["round"] for e in records), default=0) + 1
    used = sum(1 for r in sweep.runs if r.origin.startswith("refine"))
    remaining = spec.max_runs - used
    states = curves_of(sweep)
    all_rows = []
    for state in states:
        rows = _read_curve(state, spec.metric)
        all_rows += rows or []
    chance = spec.chance
    if chance == "auto" and all_rows:
        try:
            chance = logged_chance(all_rows, spec.metric)
        except LawInputError as e:
            raise ConfigError(f"{sweep.path}: refine.chance: {e}") from None
    # Located as fit_law does: curves in its order (size, then budget), one bootstrap stream each.
    measured = sorted((s for s in states if s.curve is not None and not s.status),
                      key=lambda s: (s.curve.model_params, s.curve.tokens, s.label))
    options = Options(metric=spec.metric, chance=chance, n_boot=n_boot)
    stream = VALIDATION_STREAM if sweep.kind == "validation" else 0
    reference = _ladder_plateau(sweep) if sweep.kind == "validation" else None
    for state, point in zip(measured, locate([s.curve for s in measured], options, stream,
                                             reference=reference)):
        state.collapse = point
    axis = sweep.axes[spec.axis]
    new_entries, new_runs = [], []
    known = {r.run_id for r in sweep.runs}
    for state in states:
        if state.status:  # waiting, unreadable or too few levels
            continue
        p = state.collapse
        state.width = interval_width(p)
        state.level = next_level(state.curve, p, target_width=spec.target_width,
                                 integer=axis.template.integer, limits=spec.limits)
        if state.level is None:
            state.status = "done"
            state.note = (f"<= {spec.target_width:g}: done" if state.width is not None
                          and state.width <= spec.target_width else
                          "no further level to try (limits, or levels too close to split): done")
            continue
        try:
            runs = refine_runs(sweep, state.points, state.level, f"refine round {rnd}")
            clash = [r.run_id for r in runs if r.run_id in known]
            if clash:
                raise ConfigError(f"run id {clash[0]} already exists; make the name template of axis "
                                  f"'{spec.axis}' tell {axis.template.typed(state.level)!r} apart")
        except ConfigError as e:
            state.status = "stopped"
            state.note = f"level {state.level:g} cannot be run, curve not refined further: {e}"
            continue
        if len(runs) > remaining:
            state.status = "budget"
            state.note = f"level {state.level:g} not added: max_runs ({spec.max_runs}) spent"
            continue
        remaining -= len(runs)
        state.status, state.new_runs = "added", runs
        known.update(r.run_id for r in runs)
        new_runs += runs
        new_entries.append({
            "round": rnd, "curve": state.label, "points": {a: pt.name for a, pt in state.points.items()},
            "value": axis.template.typed(state.level), "runs": [r.run_id for r in runs],
            "status": p.status, "ci_width": state.width,
            "collapse_infusion": p.collapse_infusion, "ci": list(p.ci) if p.ci else None,
        })
    for state in states:
        log(f"refine round {rnd}: {state.label}: {_describe(state)}")
    if new_entries:
        atomic_write_json(sweep.out / REFINE_FILE, {
            "axis": spec.axis, "metric": spec.metric, "added": records + new_entries})
        sweep.runs.extend(new_runs)
    return RefineStep(rnd, states, new_runs)


def refine_local(sweep: Sweep, jobs: int = 1, progress: bool = True, log=print,
                 n_boot: int = 1000) -> dict[str, str]:
    """Run the sweep here, refining it round by round until no curve proposes a level or
    ``max_runs`` is spent; returns run id -> outcome over all rounds.  A run that fails is
    not retried in later rounds of this call (its curve waits for it)."""
    outcome: dict[str, str] = {}
    failed: set[str] = set()
    while True:
        todo = replace(sweep, runs=[r for r in sweep.runs if r.run_id not in failed])
        done = run_local(todo, jobs=jobs, progress=progress, log=log)
        failed |= {k for k, v in done.items() if v.startswith("FAILED")}
        outcome.update({k: v for k, v in done.items() if k not in outcome or not v.startswith("skipped")})
        step = plan_refinement(sweep, n_boot=n_boot, log=log)
        if not step.new_runs:
            return outcome
