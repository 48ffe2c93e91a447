"""Training speed of the tiny ladder's model sizes on CPU, one thread per run as the main job
runs them: steady-state GFLOP/s per size (flops_per_token x tokens per second, the
flops_per_token that run.json records) against a single-thread fp32 matmul peak measured in
the same process, and each run's start-up (imports, model, data, probes) as one subprocess
times it.

    bash examples/tiny_ladder/run.sh --data-only     # the ladder's data, once
    python benchmarks/bench_ladder_speed.py [--steps 40] [--sizes d32,d192]

Run from the repository root. Nothing is written but a scratch run directory per size in a
temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from kis_megatron.config import load_config  # noqa: E402
from kis_megatron.sweep.grid import load_sweep  # noqa: E402

SWEEP = ROOT / "examples" / "tiny_ladder" / "sweep.yaml"


def model_overrides() -> dict[str, dict]:
    """Every size of the main job: the ladder's model axis and the validation model."""
    sweep = load_sweep(SWEEP)
    sizes = {p.name: p.overrides for p in sweep.axes["model"].points}
    sizes[sweep.validate.model.name] = sweep.validate.model.overrides
    return sizes


def matmul_peak_gflops(n: int = 512, reps: int = 20, trials: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(trials):  # the best of a few: another process may share the core
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 * reps / best / 1e9


def step_speed(overrides: dict, steps: int, workdir: Path) -> tuple[float, float]:
    """(ms per step, GFLOP/s) of the training step, after 10 warm-up steps."""
    from kis_megatron.training.trainer import Trainer

    args = [f"{k}={v}" for k, v in overrides.items()] + [
        "infusion.facts=256", f"log.dir={workdir}", "train.steps=1000", "checkpoint.save_final=false"]
    trainer = Trainer(load_config(ROOT / "examples" / "tiny_ladder" / "base.yaml", args))
    try:
        for _ in range(10):
            trainer.train_step()
        t = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        per_step = (time.perf_counter() - t) / steps
    finally:
        trainer.close()
    tokens = trainer.cfg.train.global_batch * trainer.cfg.data.seq_len
    return per_step * 1e3, trainer.model_sizes["flops_per_token"] * tokens / per_step / 1e9


def startup_s(overrides: dict, workdir: Path) -> float:
    """Wall seconds of a whole kis-train run of 1 step with its final evaluation: the part of
    every ladder run that is not training steps."""
    args = [f"{k}={v}" for k, v in overrides.items()] + [
        "infusion.facts=256", f"log.dir={workdir}", "train.steps=1", "train.warmup_steps=0"]
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kis_megatron.train", "--config",
                    str(ROOT / "examples" / "tiny_ladder" / "base.yaml"), *args],
                   check=True, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="timed steps per size (after 10 warm-up)")
    ap.add_argument("--sizes", default="", help="comma-separated subset, e.g. d32,d192")
    args = ap.parse_args()
    if not (ROOT / "out" / "tiny_ladder" / "data" / "READY").exists():
        sys.exit("error: the ladder's data is missing; run `bash examples/tiny_ladder/run.sh --data-only`")
    os.chdir(ROOT)
    torch.set_num_threads(1)
    sizes = model_overrides()
    if args.sizes:
        sizes = {k: sizes[k] for k in args.sizes.split(",")}
    peak = matmul_peak_gflops()
    print(f"torch {torch.__version__}, 1 thread, fp32 matmul 512^3 peak {peak:.1f} GFLOP/s")
    print("| size | ms/step | GFLOP/s | % of peak | run start-up + final eval (s) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, over) in enumerate(sizes.items()):
            ms, gflops = step_speed(over, args.steps, Path(tmp) / f"steps{i}")
            start = startup_s(over, Path(tmp) / f"start{i}")
            print(f"| {name} | {ms:.1f} | {gflops:.1f} | {100 * gflops / peak:.0f}% | {start:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
