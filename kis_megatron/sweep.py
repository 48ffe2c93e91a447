"""Sweeps: a grid of training runs (model sizes x infusion amounts x token budgets ...)
over one base config, run locally or printed as cluster launch commands; optionally refined
where each retention curve's collapse is least known, and validated on a larger model.

A sweep file::

    base: examples/tiny_ladder/base.yaml     # a kis-train config (relative to this file)
    out: out/tiny_ladder/runs                # one run directory per grid point
    overrides: {train.threads: 1}            # applied to every run
    axes:                                    # the grid is the product of the axes
      model:                                 # named points
        - {name: d32, overrides: {model.dim: 32}}
        - {name: d64, overrides: {model.dim: 64}}
      infusion:                              # a value axis: values and a template
        values: [32, 128, 512, 2048]
        name: "f{value:04d}"                 # str.format with `value`; default "<axis>{value}"
        overrides: {infusion.value: "{value}", infusion.domain: "data/f{value}/shard"}
        integer: true                        # generated levels are rounded to integers
      seed: {values: [0, 1], name: "s{value}", overrides: {train.seed: "{value}"}}

Run ids join the point names (``d32-f0128-s0``); each run's ``log.dir`` is ``out/<run id>``,
so a name must not hold a path separator or start with a dot. On a value axis an override
that is exactly ``"{value}"`` becomes the number itself (an int when ``integer``), other
strings are formatted (double a literal brace). Runs already finished (``run.json`` says so)
are skipped; every other run is (re)started with ``checkpoint.resume=auto``: an interrupted
one continues from its latest whole checkpoint, or starts afresh when it has none; a failed
one (e.g. diverged) is tried again, and its reason is reported if it fails again. Local runs
go largest model first (by parameter count), ``jobs`` at a time, each in its own process so a
failure stays contained.

Refinement (``tools/sweep.py FILE --refine``; sweep_refine.py)::

    refine:
      axis: infusion            # a value axis; its values must be what run.json logs as the
                                #   infusion value (infusion.value, else infusion.ratio)
      metric: retention/domain
      chance: auto              # as fit_law --chance: a number, auto, or omitted (fitted floor)
      target_width: 0.15        # decades: a curve is done when its collapse CI is this narrow
      max_runs: 8               # extra runs in all (0 disables)
      limits: [1, 2048]         # optional bounds on the axis value
      seed_axis: seed           # optional: a new level is run for every seed

A curve is the set of runs that share every axis point but the refined axis and the seed
axis. Once all of a curve's runs are finished, its collapse is located (law/collapse.py) and
``law.refine.next_level`` proposes one more level, run as a new point of the value axis.
Rounds repeat until no curve proposes or ``max_runs`` is spent. The added levels are recorded
in ``<out>/refine.json``; loading the sweep re-adds them, so refinement resumes like any sweep.
With ``--print-launch``, ``--refine`` plans one round from the runs finished so far and prints
the commands of every unfinished run: alternate launching and ``--refine --print-launch``
until it prints no run.

Validation (``tools/sweep.py FILE --validate LAW_JSON``; sweep_validate.py)::

    validate:
      model: {name: d192, overrides: {model.dim: 192}}   # the larger held-out model
      model_axis: model          # the axis that point replaces (default model)
      axis: infusion             # the levels' axis (default: refine's axis)
      levels: 5                  # runs centred on the predicted collapse point
      spacing: 0.2               # decades between levels
      refine_runs: 2             # extra runs --refine may add to this curve (default: refine's max_runs)
      out: out/validate_runs     # default: <out>_validate

It predicts the validation model's collapse point from the fitted law (N counted on the meta
device, D = global_batch * seq_len * steps of its config), runs CP * 10^(spacing * k) for
k = -(levels-1)/2 ... (levels-1)/2 crossed with the other axes (seeds repeat), records the
plan in ``<validate out>/validation_plan.json``, and with ``--refine`` refines that curve too.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import yaml
from tqdm import tqdm

from kis_megatron.config import ConfigError, load_config
from kis_megatron.model.llama import Transformer
from kis_megatron.run_dir import RunDir
from kis_megatron.sweep_spec import (
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
PLAN_FILE = "validation_plan.json"  # the validation's plan (sweep_validate.py)


@dataclass
class SweepRun:
    run_id: str
    overrides: dict[str, object]
    run_dir: Path
    params: int = 0  # model parameters, for ordering
    points: dict[str, Point] = field(default_factory=dict)  # axis -> its point
    tokens: int = 0  # token budget D: global_batch * seq_len * steps
    infusion: float = 0.0  # the infusion value run.json logs (infusion.value, else the ratio)
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
    kind: str = "ladder"  # ladder | validation (the held-out model's runs, sweep_validate.py)


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
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
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
    run.params = _param_count(cfg)
    run.tokens = cfg.train.global_batch * cfg.data.seq_len * cfg.train.steps
    inf = cfg.infusion
    run.infusion = float(inf.value if inf.value is not None else inf.ratio)
    if sweep.refine is not None:
        axis = sweep.refine.axis
        if axis in points and abs(run.infusion - points[axis].value) > 1e-9 * abs(points[axis].value):
            raise ConfigError(
                f"{sweep.path}: run {run_id}: refine axis '{axis}' has the value {points[axis].value} but the "
                f"run logs the infusion value {run.infusion:g} (infusion.value, else infusion.ratio); "
                f"add infusion.value: \"{{value}}\" to the overrides of axis '{axis}' so that refinement "
                "and fit_law measure the same levels")
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


def _param_count(cfg) -> int:
    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


def run_info(run: SweepRun) -> dict:
    """The run's record ({} when it has none or it is unreadable)."""
    return RunDir(run.run_dir).info()


def run_status(run: SweepRun) -> str:
    """finished | failed (tried again) | partial | interrupted | new (RunDir.progress)."""
    return RunDir(run.run_dir).progress()


def train_args(sweep: Sweep, run: SweepRun) -> list[str]:
    """kis-train's arguments for one run."""
    return ["--config", str(sweep.base), *run.override_args(), "checkpoint.resume=auto"]


def train_command(sweep: Sweep, run: SweepRun, launcher: str = "python") -> list[str]:
    args = train_args(sweep, run)
    if launcher == "python":
        return [sys.executable, "-m", "kis_megatron.train", *args]
    if launcher == "torchrun":
        return ["torchrun", "--nnodes=${NNODES:-1}", "--nproc-per-node=${NPROC_PER_NODE:-1}",
                "--rdzv-backend=c10d", "--rdzv-endpoint=${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}",
                "-m", "kis_megatron.train", *args]
    raise ConfigError(f"unknown launcher {launcher!r}")


def print_launch(sweep: Sweep, kind: str) -> str:
    """Shell text that launches every unfinished run on a cluster instead of here."""
    todo = [r for r in sweep.runs if run_status(r) != "finished"]
    if kind == "torchrun":
        lines = ["# one line per run; run each on its node(s) with NNODES, NPROC_PER_NODE,",
                 "# MASTER_ADDR and MASTER_PORT set (or use examples/launch/torchrun_multinode.sh)"]
        lines += [" ".join(_quote(a) for a in train_command(sweep, r, "torchrun")) for r in todo]
        return "\n".join(lines) + "\n"
    if kind == "slurm":
        lines = ["# a SLURM array: one task per run (examples/launch/sweep_array.sbatch reads this list)",
                 f"# sbatch --array=0-{max(len(todo) - 1, 0)} examples/launch/sweep_array.sbatch RUNS_FILE"]
        lines += [" ".join(_quote(a) for a in train_command(sweep, r, "python")[1:]) for r in todo]
        return "\n".join(lines) + "\n"
    raise ConfigError(f"--print-launch takes torchrun or slurm, not {kind!r}")


def _quote(arg: str) -> str:
    return arg if "${" in arg else shlex.quote(arg)


_AGAIN = {"partial": "interrupted earlier; resumes from its latest checkpoint",
          "interrupted": "interrupted before its first checkpoint; starts afresh",
          "failed": "failed earlier; tried again"}


TRAINER = "kis_megatron.train"  # run by name, as `python -m` does: the sweep never imports it


def _train_in_child(args: list[str], log_path: str) -> None:
    """A forked run: ``python -m kis_megatron.train ARGS`` in this process, its output in the
    run's train.log, its exit code the trainer's, as for a subprocess."""
    import runpy

    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ["PYTHONUNBUFFERED"] = "1"
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [TRAINER, *args]
    sys.modules.pop(TRAINER, None)  # preloaded for its imports; run afresh as __main__
    code = 0
    try:
        runpy.run_module(TRAINER, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class _ForkedRun:
    """One run trained in a child of a fork server that imported the trainer once
    (``multiprocessing``'s forkserver), so a run skips the interpreter's and torch's start-up
    (~2 s of a tiny CPU run's ~15 s). Same arguments, log and exit code as a subprocess;
    ``KIS_SWEEP_FORK=0`` starts every run as its own process instead."""

    _context = None

    def __init__(self, args: list[str], log_path: Path):
        import multiprocessing

        if _ForkedRun._context is None:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([TRAINER])
            _ForkedRun._context = ctx
        self.proc = _ForkedRun._context.Process(target=_train_in_child, args=(args, str(log_path)))
        self.proc.start()

    def poll(self) -> Optional[int]:
        return None if self.proc.is_alive() else self.proc.exitcode


def _start(sweep: Sweep, run: SweepRun, env: dict) -> object:
    """Start one run in the background: an object with ``poll()`` -> exit code or None."""
    log_path = run.run_dir / "train.log"
    if os.environ.get("KIS_SWEEP_FORK", "1") != "0" and sys.platform != "win32":
        return _ForkedRun(train_args(sweep, run), log_path)
    with open(log_path, "a") as logf:
        return subprocess.Popen(train_command(sweep, run), stdout=logf, stderr=subprocess.STDOUT,
                                env={**env, "PYTHONUNBUFFERED": "1"})


def run_local(sweep: Sweep, jobs: int = 1, progress: bool = True, log=print) -> dict[str, str]:
    """Run every unfinished run, ``jobs`` at a time (largest first); returns run id -> outcome."""
    todo = sorted((r for r in sweep.runs if run_status(r) != "finished"), key=lambda r: -r.params)
    outcome = {r.run_id: "skipped (finished)" for r in sweep.runs if run_status(r) == "finished"}
    if outcome:
        log(f"sweep: {len(outcome)} of {len(sweep.runs)} runs already finished, skipped")
    bar = None
    if progress and todo:
        bar = tqdm(total=len(todo), unit="run", desc="sweep", disable=not sys.stderr.isatty())
    running: list[tuple[SweepRun, object, float]] = []
    queue = list(todo)
    env = dict(os.environ)
    while queue or running:
        while queue and len(running) < jobs:
            run = queue.pop(0)
            status = run_status(run)
            if status != "new":  # resumable (or tried again): said so, it is not a failure
                log(f"sweep: {run.run_id}: {_AGAIN[status]}")
            run.run_dir.mkdir(parents=True, exist_ok=True)
            running.append((run, _start(sweep, run, env), time.time()))
        time.sleep(0.2)
        for item in list(running):
            run, proc, t0 = item
            rc = proc.poll()
            if rc is None:
                continue
            running.remove(item)
            dt = time.time() - t0
            if rc == 0:
                outcome[run.run_id] = f"finished in {dt:.0f}s"
            else:
                reason = run_info(run).get("error") if run_status(run) == "failed" else None
                outcome[run.run_id] = (f"FAILED (exit {rc}{': ' + reason if reason else ''}; "
                                       f"see {run.run_dir / 'train.log'})")
            log(f"sweep: {run.run_id}: {outcome[run.run_id]}")
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return outcome
