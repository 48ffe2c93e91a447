"""Validation of a fitted law on a larger, held-out model (the ``validate:`` section, see
sweep.py): runs of that model at infusion levels centred on the collapse point the law
predicts for it, so that its measured collapse can be compared with the prediction.

The prediction uses law.json as tools/fit_law.py writes it: CP = coefficient * N^exponent
(* D^tokens_exponent when the law has a D term), with N the validation model's parameters
(counted on the meta device, as run.json will report them) and D = train.global_batch *
data.seq_len * train.steps from its resolved config.  The levels are CP * 10^(spacing * k),
k = -(levels-1)/2 ... (levels-1)/2 (rounded on an integer axis, clipped to refine's limits,
duplicates removed), crossed with every axis but the model axis and the levels' axis, so seeds
repeat.  With a token-budget axis each budget gets its own prediction.

``<validate out>/validation_plan.json`` records the law (path and sha256), N, D, the
prediction and the levels of each curve.  A rerun with the same law.json resumes; a plan made
from another law.json is refused unless ``force_new_plan``, which sets the old plan aside
(renamed with the old law's hash; its refine.json too unless the levels stay the same) and
never deletes a run.  When the runs have finished, ``tools/fit_law.py --runs LADDER
--validation-runs <validate out>`` measures the collapse and compares it with the prediction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from pathlib import Path

import numpy as np

from kis_megatron.config import ConfigError
from kis_megatron.sweep import REFINE_FILE, Sweep, add_refined_runs, build_run
from kis_megatron.sweep_spec import Axis
from kis_megatron.utils import atomic_write_json

PLAN_FILE = "validation_plan.json"


def read_law(path: str | Path) -> tuple[dict, str]:
    """law.json's content and the sha256 of its bytes; ConfigError when it is not a law."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"law file not found: {path} (write it with tools/fit_law.py --out DIR)")
    data = path.read_bytes()
    try:
        law = json.loads(data)
        a, b, c = law["coefficient"], law["exponent"], law.get("tokens_exponent")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (a, b)) or a <= 0 \
                or not (c is None or isinstance(c, (int, float)) and math.isfinite(c)):
            raise ValueError("coefficient must be > 0, exponent and tokens_exponent finite numbers")
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a law.json written by tools/fit_law.py "
                          f"({type(e).__name__}: {e})") from None
    return law, hashlib.sha256(data).hexdigest()


def predict_collapse(law: dict, n: float, d: float) -> float:
    """CP = coefficient * N^exponent (* D^tokens_exponent)."""
    cp = law["coefficient"] * n ** law["exponent"]
    if law.get("tokens_exponent") is not None:
        cp *= d ** law["tokens_exponent"]
    return float(cp)


def validation_levels(cp: float, levels: int, spacing: float, integer: bool = False,
                      limits: tuple[float, float] = (0.0, math.inf)) -> list:
    """CP * 10^(spacing * k) for k = -(levels-1)/2 ... (levels-1)/2, rounded when ``integer``,
    clipped to ``limits``, without duplicates or non-positive levels, ascending."""
    out = []
    for k in np.arange(levels) - (levels - 1) / 2:
        v = min(max(cp * 10 ** (spacing * float(k)), limits[0]), limits[1])
        v = int(round(v)) if integer else float(v)
        if v > 0 and v not in out:
            out.append(v)
    return sorted(out)


def validation_sweep(sweep: Sweep, law_path: str | Path, *, force_new_plan: bool = False,
                     write: bool = True, log=print) -> Sweep:
    """The validation runs of ``sweep`` for the law in ``law_path``, as a sweep of their own
    (out: the validate out directory; refine: the ladder's settings), with the plan written
    to ``<validate out>/validation_plan.json`` (unless ``write`` is False)."""
    spec = sweep.validate
    if spec is None:
        raise ConfigError(f"{sweep.path}: --validate needs a validate: section in the sweep file")
    law, sha = read_law(law_path)
    axes: dict[str, Axis] = {a: (Axis(a, [spec.model]) if a == spec.model_axis else ax)
                             for a, ax in sweep.axes.items()}
    refine = sweep.refine
    if refine is not None and spec.refine_runs is not None:
        refine = dataclasses.replace(refine, max_runs=spec.refine_runs)
    vsweep = Sweep(base=sweep.base, out=spec.out, path=sweep.path, common=dict(sweep.common),
                   axes=axes, refine=refine, kind="validation")
    seed_axis = sweep.refine.seed_axis if sweep.refine else None
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
        cp = predict_collapse(law, run.params, run.tokens)
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
    plan = {
        "law": str(Path(law_path).resolve()), "law_sha256": sha, "form": law.get("form"),
        "coefficient": law["coefficient"], "exponent": law["exponent"],
        "tokens_exponent": law.get("tokens_exponent"), "metric": law.get("metric"),
        "model": {"name": spec.model.name, "overrides": spec.model.overrides},
        "model_axis": spec.model_axis, "axis": spec.axis, "levels_requested": spec.levels,
        "spacing": spec.spacing, "curves": curves,
    }
    if sweep.refine and law.get("metric") not in (None, sweep.refine.metric):
        log(f"validate: note: the law was fitted on {law['metric']}, refine: measures {sweep.refine.metric}")
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
