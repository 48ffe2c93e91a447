"""Running a sweep: locally, ``jobs`` runs at a time in a pool of forked trainers, or as
launch text for torchrun and SLURM arrays."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from kis_megatron.config import ConfigError
from kis_megatron.sweep.grid import Sweep, SweepRun
from kis_megatron.sweep.status import run_info, run_status


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


# Run by name, as `python -m` does: the sweep process never imports the trainer (only the
# fork server, a process of its own, preloads it for its children).
TRAINER = "kis_megatron.train"


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
