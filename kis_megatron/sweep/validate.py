"""Validation of a fitted law on a larger, held-out model (the ``validate:`` section, see
sweep.py): runs of that model at infusion levels centred on the collapse point the law
predicts for it, so that its measured collapse can be compared with the prediction.

The prediction is the one tools/fit_law.py made, through law/lawfile.py (the selected form
of the law, from its law.json), with N the validation model's parameters (counted on the meta
device, as run.json will report them), D = train.global_batch * data.seq_len * train.steps from
its resolved config and the ladder's domain share.  The levels are the ``levels`` points of the
fixed grid 10^(spacing * j), j integer, nearest the prediction (rounded on an integer axis,
clipped to refine's limits, duplicates removed): a prediction that moves by a fraction of a
grid step keeps its levels, so the measured point does not move with the fit's last digits.
They are crossed with every axis but the model axis and the levels' axis, so seeds repeat;
``seeds: [...]`` runs every level once per train.seed (a seed axis of the validation alone).
With a token-budget axis each budget gets its own prediction.

``<validate out>/validation_plan.json`` records the law (path and sha256), N, D, the
prediction and the levels of each curve.  A rerun with the same law.json resumes; a plan made
from another law.json is refused unless ``force_new_plan``, which sets the old plan aside
(renamed with the old law's hash; its refine.json too unless the levels stay the same) and
never deletes a run.  When the runs have finished, ``tools/fit_law.py --runs LADDER
--validation-runs <validate out>`` measures the collapse and compares it with the prediction.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

from kis_megatron.config import ConfigError
from kis_megatron.errors import KisError
from kis_megatron.law import lawfile
from kis_megatron.law.lawfile import LawFile, LawFileError
from kis_megatron.sweep.grid import PLAN_FILE, REFINE_FILE, Sweep, add_refined_runs, build_run
from kis_megatron.sweep.spec import Axis, ValueTemplate
from kis_megatron.utils import atomic_write_json

SEED_AXIS = "seed"


def read_law(path: str | Path) -> LawFile:
    """law.json through lawfile.read_law, its errors as ConfigError (a sweep's error)."""
    try:
        return lawfile.read_law(path)
    except LawFileError as e:
        raise ConfigError(str(e)) from None


def validation_levels(cp: float, levels: int, spacing: float, integer: bool = False,
                      limits: tuple[float, float] = (0.0, math.inf)) -> list:
    """The ``levels`` points of the grid 10^(spacing * j) nearest ``cp`` (in log), rounded when
    ``integer``, clipped to ``limits``, without duplicates or non-positive levels, ascending."""
    x = math.log10(cp) / spacing
    first = math.floor(x - (levels - 1) / 2 + 0.5)  # the block of grid points centred on x
    out = []
    for j in range(first, first + levels):
        v = min(max(10 ** (spacing * j), limits[0]), limits[1])
        v = int(round(v)) if integer else float(v)
        if v > 0 and v not in out:
            out.append(v)
    return sorted(out)


def _seed_axis(spec) -> Axis:
    """The validation's own seed axis (``validate: seeds``)."""
    template = ValueTemplate("validate: seeds", "s{value}", {"train.seed": "{value}"}, integer=True)
    return Axis(SEED_AXIS, [template.point(s) for s in spec.seeds], template)


def validation_sweep(sweep: Sweep, law_path: str | Path, *, force_new_plan: bool = False,
                     write: bool = True, log=print) -> Sweep:
    """The validation runs of ``sweep`` for the law in ``law_path``, as a sweep of their own
    (out: the validate out directory; refine: the ladder's settings), with the plan written
    to ``<validate out>/validation_plan.json`` (unless ``write`` is False)."""
    spec = sweep.validate
    if spec is None:
        raise ConfigError(f"{sweep.path}: --validate needs a validate: section in the sweep file")
    law = read_law(law_path)
    sha = law.sha256
    axes: dict[str, Axis] = {a: (Axis(a, [spec.model]) if a == spec.model_axis else ax)
                             for a, ax in sweep.axes.items()}
    seed_axis = sweep.refine.seed_axis if sweep.refine else None
    if spec.seeds:
        if SEED_AXIS in axes:
            raise ConfigError(f"{sweep.path}: validate: seeds needs an axis named {SEED_AXIS!r}, "
                              "and the sweep has one already; use refine's seed_axis instead")
        axes[SEED_AXIS] = _seed_axis(spec)
        seed_axis = SEED_AXIS
    refine = sweep.refine
    if refine is not None:
        refine = dataclasses.replace(refine, seed_axis=seed_axis,
                                     **({} if spec.refine_runs is None else {"max_runs": spec.refine_runs}))
    vsweep = Sweep(base=sweep.base, out=spec.out, path=sweep.path, common=dict(sweep.common),
                   axes=axes, refine=refine, kind="validation")
    level_axis = axes[spec.axis]
    others = [a for a in axes if a not in (spec.model_axis, spec.axis, seed_axis)]
    seeds = axes[seed_axis].points if seed_axis else [None]
    limits = sweep.refine.limits if sweep.refine else (0.0, math.inf)
    curves = []
    for combo in itertools.product(*(axes[a].points for a in others)):
        points = {**dict(zip(others, combo)), spec.model_axis: spec.model}
        probe = {**points, spec.axis: level_axis.points[0]}  # N and D do not depend on the level
        if seed_axis:
            probe[seed_axis] = seeds[0]
        run = build_run(vsweep, probe)
        try:
            cp = law.predict(run.params, run.tokens)
        except KisError as e:
            raise ConfigError(f"{law_path}: {e}") from None
        levels = validation_levels(cp, spec.levels, spec.spacing, level_axis.template.integer, limits)
        if not levels:
            raise ConfigError(f"{sweep.path}: validate: no positive level around the predicted {cp:.4g}")
        label = "-".join(p.name for p in points.values())
        curves.append({"curve": label, "points": {a: p.name for a, p in points.items()},
                       "model_params": run.params, "tokens": run.tokens, "predicted": cp, "levels": levels})
        for v in levels:
            for s in seeds:
                pts = {**points, spec.axis: level_axis.point(v)}
                if s is not None:
                    pts[seed_axis] = s
                vsweep.runs.append(build_run(vsweep, pts, "validation"))
        log(f"validate: {label}: N={run.params:.4g}, D={run.tokens:.4g}: predicted collapse "
            f"{cp:.4g}; levels {', '.join(f'{v:g}' for v in levels)}")
    ids = [r.run_id for r in vsweep.runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ConfigError(f"{sweep.path}: validate: two levels give the run id {dup!r}; make the name "
                          f"template of axis '{spec.axis}' finer")
    doc = law.doc
    plan = {
        "law": str(Path(law_path).resolve()), "law_sha256": sha, "form": law.selected,
        "coefficient": doc["coefficient"], "exponent": doc["exponent"],
        "tokens_exponent": doc.get("tokens_exponent"), "metric": law.metric,
        "seeds": spec.seeds,
        "model": {"name": spec.model.name, "overrides": spec.model.overrides},
        "model_axis": spec.model_axis, "axis": spec.axis, "levels_requested": spec.levels,
        "spacing": spec.spacing, "curves": curves,
    }
    if sweep.refine and law.metric not in (None, sweep.refine.metric):
        log(f"validate: note: the law was fitted on {law.metric}, refine: measures {sweep.refine.metric}")
    stale = _check_plan(vsweep.out, sha, law_path, force_new_plan, write, curves)
    if write:
        atomic_write_json(vsweep.out / PLAN_FILE, plan)
    if not stale or write:  # a new plan with other levels starts without the old refined ones
        add_refined_runs(vsweep)
    return vsweep


def _check_plan(out: Path, sha: str, law_path, force: bool, write: bool, curves: list[dict]) -> bool:
    """Whether a plan from another law.json is there (with other levels): refused unless
    ``force``, then (when ``write``) set aside, with its refine.json unless the levels stay
    the same (a law refitted to the same coefficients, e.g. with --validation-runs)."""
    path = out / PLAN_FILE
    if not path.is_file():
        return False
    try:
        old = json.loads(path.read_text())
        old_sha, old_law = old["law_sha256"], old.get("law")
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a validation plan; restore it or move it away") from None
    if old_sha == sha:
        return False
    same = old.get("curves") == json.loads(json.dumps(curves))
    if not force:
        hint = (" (it predicts the same levels: a refit that only added its validation? then "
                "--force-new-plan keeps the refined levels too)" if same else "")
        raise ConfigError(
            f"{path} was planned from another law ({old_law}, sha256 {old_sha[:12]}), not {law_path} "
            f"(sha256 {sha[:12]}){hint}; its runs in {out} are kept either way: pass --force-new-plan "
            "to plan from the new law, or use the law.json the plan was made from")
    if write:
        _set_aside(path, old_sha[:12])
        if (out / REFINE_FILE).is_file() and not same:
            _set_aside(out / REFINE_FILE, old_sha[:12])
    return not same


def _set_aside(path: Path, tag: str) -> None:
    """Rename ``name.json`` to ``name.<tag>.json`` (``name.<tag>.2.json`` ... if taken)."""
    target, k = path.with_suffix(f".{tag}.json"), 1
    while target.exists():
        k += 1
        target = path.with_suffix(f".{tag}.{k}.json")
    path.rename(target)
