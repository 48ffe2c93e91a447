"""A sweep's runs: the grid of its axes (and the levels refinement added), each run's config
resolved, its parameters counted (model.llama.model_sizes) and its budget and infusion known.
The file format is in the package docstring (kis_megatron/sweep/__init__.py)."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from kis_megatron.config import ConfigError, infusion_value, load_config
from kis_megatron.utils import read_yaml
from kis_megatron.sweep.spec import (
    Axis,
    Point,
    RefineSpec,
    ValidateSpec,
    overrides_mapping,
    parse_axis,
    parse_refine,
    parse_validate,
)

REFINE_FILE = "refine.json"  # in the sweep's out directory: the levels refinement added
PLAN_FILE = "validation_plan.json"  # the validation's plan (validate.py)


@dataclass
class SweepRun:
    run_id: str
    overrides: dict[str, object]
    run_dir: Path
    params: int = 0  # model parameters, for ordering
    points: dict[str, Point] = field(default_factory=dict)  # axis -> its point
    tokens: int = 0  # token budget D: global_batch * seq_len * steps
    infusion: Optional[float] = None  # the infusion value run.json logs (config.infusion_value)
    origin: str = "grid"  # grid | refine round K | validation

    def override_args(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.overrides.items()] + [f"log.dir={self.run_dir}"]


@dataclass
class Sweep:
    base: Path
    out: Path
    runs: list[SweepRun] = field(default_factory=list)
    path: Optional[Path] = None  # the sweep file, for messages
    common: dict = field(default_factory=dict)  # overrides applied to every run
    axes: dict[str, Axis] = field(default_factory=dict)
    refine: Optional[RefineSpec] = None
    validate: Optional[ValidateSpec] = None
    kind: str = "ladder"  # ladder | validation (the held-out model's runs, validate.py)


def _yaml_scalar(v) -> str:
    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every run's config is resolved (so a typo in any
    grid point fails here, before the first run starts).  Levels that refinement added
    (``<out>/refine.json``) are runs of the sweep too."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    doc = read_yaml(path, ConfigError, "the sweep file") or {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with base, out, axes "
                          f"(and overrides, refine, validate), not a {type(doc).__name__}")
    unknown = set(doc) - {"base", "out", "overrides", "axes", "refine", "validate"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; use base, out, overrides, axes, "
                          "refine, validate")
    for key in ("base", "out", "axes"):
        if key not in doc:
            raise ConfigError(f"{path}: missing '{key}'")
    for key in ("base", "out"):
        if not isinstance(doc[key], str) or not doc[key]:
            raise ConfigError(f"{path}: '{key}' must be a path, got {doc[key]!r}")
    here = path.parent
    base = (here / doc["base"]) if not Path(doc["base"]).is_absolute() else Path(doc["base"])
    out = Path(doc["out"])
    common = overrides_mapping(doc.get("overrides"), f"{path}: 'overrides'")
    axes = doc["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{path}: 'axes' must map axis names to lists of points or value axes")
    parsed = {str(axis): parse_axis(str(path), str(axis), spec) for axis, spec in axes.items()}
    sweep = Sweep(base=base, out=out, path=path, common=dict(common), axes=parsed)
    if doc.get("refine") is not None:
        sweep.refine = parse_refine(str(path), doc["refine"], parsed)
    if doc.get("validate") is not None:
        sweep.validate = parse_validate(str(path), doc["validate"], parsed, sweep.refine, out)
    seen = set()
    for combo in itertools.product(*(a.points for a in parsed.values())):
        run = build_run(sweep, dict(zip(parsed, combo)))
        if run.run_id in seen:
            raise ConfigError(f"{path}: two grid points share the run id {run.run_id!r}")
        seen.add(run.run_id)
        sweep.runs.append(run)
    add_refined_runs(sweep)
    return sweep


def _check_run_id(run_id: str, path: Path) -> None:
    """A run id is one directory name under ``out``: it must not lead anywhere else."""
    if not run_id.strip() or run_id.startswith(".") or any(c in run_id for c in "/\\\0") \
            or Path(run_id).is_absolute():
        raise ConfigError(f"{path}: run id {run_id!r} (the points' names joined by '-') must be "
                          "one directory name: no '/', '\\' or leading '.'")


def build_run(sweep: Sweep, points: dict[str, Point], origin: str = "grid") -> SweepRun:
    """The run of one point per axis (in the sweep's axis order), its config resolved: the
    sweep's common overrides, then each point's."""
    from kis_megatron.model.llama import model_sizes  # torch, only once a run is built

    points = {a: points[a] for a in sweep.axes if a in points}
    run_id = "-".join(str(p.name) for p in points.values())
    _check_run_id(run_id, sweep.path)
    overrides = dict(sweep.common)
    for p in points.values():
        overrides.update(p.overrides)
    run = SweepRun(run_id, overrides, sweep.out / run_id, points=points, origin=origin)
    try:
        cfg = load_config(sweep.base, run.override_args())
    except ConfigError as e:
        raise ConfigError(f"{sweep.path}: run {run_id}: {e}") from None
    run.params = model_sizes(cfg.model, cfg.data.seq_len)["model_params"]
    run.tokens = cfg.train.global_batch * cfg.data.seq_len * cfg.train.steps
    run.infusion = infusion_value(cfg.infusion)
    if sweep.refine is not None:
        axis = sweep.refine.axis
        if axis in points and (run.infusion is None or
                               abs(run.infusion - points[axis].value) > 1e-9 * abs(points[axis].value)):
            logged = "every fact of the shard" if run.infusion is None else f"{run.infusion:g}"
            raise ConfigError(
                f"{sweep.path}: run {run_id}: refine axis '{axis}' has the value {points[axis].value} but the "
                f"run logs the infusion value {logged} (infusion.kind={cfg.infusion.kind}); make the axis "
                "set the knob of that kind (infusion.ratio, infusion.facts, or infusion.value with "
                "infusion.kind=custom) so that refinement and fit_law measure the same levels")
    return run


def refined_points(sweep: Sweep) -> list[dict]:
    """The entries of ``<out>/refine.json`` (empty when refinement added nothing yet)."""
    path = sweep.out / REFINE_FILE
    if sweep.refine is None or not path.is_file():
        return []
    try:
        doc = json.loads(path.read_text())
        entries = doc["added"]
        if doc.get("axis") != sweep.refine.axis:
            raise ConfigError(f"{path} refines axis {doc.get('axis')!r}, the sweep file axis "
                              f"{sweep.refine.axis!r}; move {path} away to start refining afresh")
        for e in entries:
            if not (isinstance(e["round"], int) and isinstance(e["points"], dict)
                    and isinstance(e["value"], (int, float))):
                raise TypeError
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a refinement record ({type(e).__name__}: {e}); "
                          "restore it or move it away") from None
    return entries


def refine_runs(sweep: Sweep, curve: dict[str, Point], value, origin: str) -> list[SweepRun]:
    """The runs of one refined level of one curve: one per point of the seed axis."""
    spec = sweep.refine
    axis = sweep.axes[spec.axis]
    seeds = sweep.axes[spec.seed_axis].points if spec.seed_axis else [None]
    runs = []
    for s in seeds:
        points = {**curve, spec.axis: axis.point(value)}
        if s is not None:
            points[spec.seed_axis] = s
        runs.append(build_run(sweep, points, origin))
    return runs


def add_refined_runs(sweep: Sweep) -> None:
    """Append the runs of the levels recorded in ``<out>/refine.json``."""
    known = {r.run_id: r for r in sweep.runs}
    for e in refined_points(sweep):
        curve = {}
        for axis, name in e["points"].items():
            found = [p for p in sweep.axes[axis].points if p.name == name] if axis in sweep.axes else []
            if not found:
                raise ConfigError(f"{sweep.out / REFINE_FILE} refined curve {e.get('curve')!r}, but the sweep "
                                  f"has no point {name!r} on axis {axis!r} any more; restore it, or move "
                                  "refine.json away to start refining afresh")
            curve[axis] = found[0]
        for run in refine_runs(sweep, curve, e["value"], f"refine round {e['round']}"):
            if run.run_id in known:
                if known[run.run_id].overrides != run.overrides:
                    raise ConfigError(f"{sweep.path}: the refined run {run.run_id} has the id of another "
                                      "run with other overrides; make the value axis name template finer")
                continue
            known[run.run_id] = run
            sweep.runs.append(run)


