"""Sweeps: a grid of training runs (model sizes x infusion amounts x token budgets ...)
over one base config, run locally or printed as cluster launch commands.

A sweep file::

    base: examples/tiny_ladder/base.yaml     # a kis-train config (relative to this file)
    out: out/tiny_ladder/runs                # one run directory per grid point
    overrides: {train.threads: 1}            # applied to every run
    axes:                                    # the grid is the product of the axes
      model:
        - {name: d32, overrides: {model.dim: 32}}
        - {name: d64, overrides: {model.dim: 64}}
      infusion:
        - {name: r010, overrides: {infusion.ratio: 0.1}}
        - {name: r030, overrides: {infusion.ratio: 0.3}}

Run ids join the point names (``d32-r010``); each run's ``log.dir`` is ``out/<run id>``, so a
name must not hold a path separator or start with a dot. Runs already finished (``run.json``
says so) are skipped; every other run is (re)started with ``checkpoint.resume=auto``: an
interrupted one continues from its latest whole checkpoint, or starts afresh when it has none;
a failed one (e.g. diverged) is tried again, and its reason is reported if it fails again.
Local runs go largest model first (by parameter count), ``jobs`` at a time, each in its own
process so a failure stays contained.
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

import yaml

from kis_megatron.config import ConfigError, load_config
from kis_megatron.errors import KisError, exit_with


@dataclass
class SweepRun:
    run_id: str
    overrides: dict[str, object]
    run_dir: Path
    params: int = 0  # model parameters, for ordering

    def override_args(self) -> list[str]:
        return [f"{k}={_yaml_scalar(v)}" for k, v in self.overrides.items()] + [f"log.dir={self.run_dir}"]


@dataclass
class Sweep:
    base: Path
    out: Path
    runs: list[SweepRun] = field(default_factory=list)


def _yaml_scalar(v) -> str:
    if isinstance(v, (dict, list)):
        return yaml.safe_dump(v, default_flow_style=True).strip()
    return str(v)


def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file; every run's config is resolved (so a typo in any
    grid point fails here, before the first run starts)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep file not found: {path}")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with base, out, axes "
                          f"(and overrides), not a {type(doc).__name__}")
    unknown = set(doc) - {"base", "out", "overrides", "axes"}
    if unknown:
        raise ConfigError(f"{path}: unknown sweep keys {sorted(unknown)}; use base, out, overrides, axes")
    for key in ("base", "out", "axes"):
        if key not in doc:
            raise ConfigError(f"{path}: missing '{key}'")
    for key in ("base", "out"):
        if not isinstance(doc[key], str) or not doc[key]:
            raise ConfigError(f"{path}: '{key}' must be a path, got {doc[key]!r}")
    here = path.parent
    base = (here / doc["base"]) if not Path(doc["base"]).is_absolute() else Path(doc["base"])
    out = Path(doc["out"])
    common = _overrides(doc.get("overrides"), f"{path}: 'overrides'")
    axes = doc["axes"]
    if not isinstance(axes, dict) or not axes:
        raise ConfigError(f"{path}: 'axes' must map axis names to lists of points")
    points_per_axis = []
    for axis, points in axes.items():
        if not isinstance(points, list) or not points:
            raise ConfigError(f"{path}: axis '{axis}' must be a non-empty list")
        for p in points:
            if not isinstance(p, dict) or "name" not in p or set(p) - {"name", "overrides"}:
                raise ConfigError(f"{path}: axis '{axis}': each point is {{name: ..., overrides: {{...}}}}, got {p!r}")
            if isinstance(p["name"], bool) or not isinstance(p["name"], (str, int, float)):
                raise ConfigError(f"{path}: axis '{axis}': a point's name must be a string, got {p['name']!r}")
            _overrides(p.get("overrides"), f"{path}: axis '{axis}', point {p['name']!r}: overrides")
        points_per_axis.append(points)
    sweep = Sweep(base=base, out=out)
    seen = set()
    for combo in itertools.product(*points_per_axis):
        run_id = "-".join(str(p["name"]) for p in combo)
        _check_run_id(run_id, path)
        if run_id in seen:
            raise ConfigError(f"{path}: two grid points share the run id {run_id!r}")
        seen.add(run_id)
        overrides = dict(common)
        for p in combo:
            overrides.update(p.get("overrides") or {})
        run = SweepRun(run_id, overrides, out / run_id)
        try:
            cfg = load_config(base, run.override_args())
        except ConfigError as e:
            raise ConfigError(f"{path}: run {run_id}: {e}") from None
        run.params = _param_count(cfg)
        sweep.runs.append(run)
    return sweep


def _overrides(value, where: str) -> dict:
    """Overrides are a mapping of dotted keys to values (``{model.dim: 64}``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of dotted keys to values, e.g. "
                          f"{{model.dim: 64}}, not a {type(value).__name__}: {value!r}")
    return value


def _check_run_id(run_id: str, path: Path) -> None:
    """A run id is one directory name under ``out``: it must not lead anywhere else."""
    if not run_id.strip() or run_id.startswith(".") or any(c in run_id for c in "/\\\0") \
            or Path(run_id).is_absolute():
        raise ConfigError(f"{path}: run id {run_id!r} (the points' names joined by '-') must be "
                          "one directory name: no '/', '\\' or leading '.'")


def _param_count(cfg) -> int:
    import torch

    from kis_megatron.model.llama import Transformer

    with torch.device("meta"):
        return Transformer(cfg.model).num_params()


def run_info(run: SweepRun) -> dict:
    """The run's run.json ({} when it has none or it is unreadable)."""
    try:
        info = json.loads((run.run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def run_status(run: SweepRun) -> str:
    """finished | failed (run.json says so; tried again) | partial (resumes from a complete
    checkpoint) | interrupted (started, no complete checkpoint: resumes afresh) | new."""
    from kis_megatron.training.checkpoint import CheckpointManager

    status = run_info(run).get("status")
    if status in ("finished", "failed"):
        return status
    if CheckpointManager(run.run_dir / "checkpoints").complete_checkpoints():
        return "partial"
    if status is not None or (run.run_dir / "metrics.jsonl").exists():
        return "interrupted"
    return "new"


def train_command(sweep: Sweep, run: SweepRun, launcher: str = "python") -> list[str]:
    args = ["--config", str(sweep.base), *run.override_args(), "checkpoint.resume=auto"]
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


def run_local(sweep: Sweep, jobs: int = 1, progress: bool = True, log=print) -> dict[str, str]:
    """Run every unfinished run, ``jobs`` at a time (largest first); returns run id -> outcome."""
    todo = sorted((r for r in sweep.runs if run_status(r) != "finished"), key=lambda r: -r.params)
    outcome = {r.run_id: "skipped (finished)" for r in sweep.runs if run_status(r) == "finished"}
    if outcome:
        log(f"sweep: {len(outcome)} of {len(sweep.runs)} runs already finished, skipped")
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="run", desc="sweep", disable=not sys.stderr.isatty())
    running: list[tuple[SweepRun, subprocess.Popen, float]] = []
    queue = list(todo)
    env = dict(os.environ)
    while queue or running:
        while queue and len(running) < jobs:
            run = queue.pop(0)
            status = run_status(run)
            if status != "new":  # resumable (or tried again): said so, it is not a failure
                log(f"sweep: {run.run_id}: {_AGAIN[status]}")
            run.run_dir.mkdir(parents=True, exist_ok=True)
            logf = open(run.run_dir / "train.log", "a")
            proc = subprocess.Popen(train_command(sweep, run), stdout=logf, stderr=subprocess.STDOUT,
                                    env={**env, "PYTHONUNBUFFERED": "1"})
            running.append((run, proc, time.time()))
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


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="tools/sweep.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="sweep YAML file")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each should use 1/jobs of the cores)")
    ap.add_argument("--print-launch", choices=["torchrun", "slurm"],
                    help="print the cluster commands for the unfinished runs instead of running them")
    ap.add_argument("--list", action="store_true", help="list the runs and their status")
    args = ap.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep)
        if args.list or args.print_launch:  # let `| head` end the listing quietly
            import signal

            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        if args.list:
            for r in sweep.runs:
                print(f"{r.run_id:30s} {r.params:>12,d} params  {run_status(r)}")
            return 0
        if args.print_launch:
            sys.stdout.write(print_launch(sweep, args.print_launch))
            return 0
        if args.jobs < 1:
            raise ConfigError("--jobs must be >= 1")
        outcome = run_local(sweep, jobs=args.jobs)
    except KisError as e:
        return exit_with(e)
    failed = [k for k, v in outcome.items() if v.startswith("FAILED")]
    if failed:
        print(f"error: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
