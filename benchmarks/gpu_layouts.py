"""Parallel layouts on two devices reproduce one process: losses and gradient norms of a few
training steps of a small model, in fp32, one process against tp=2, dp=2 and pp=2 under
torchrun (NCCL on CUDA, gloo with ``--device cpu``).

    python benchmarks/gpu_layouts.py --train out/tiny_ladder/data/shards/general \\
        --tokenizer out/tiny_ladder/data/tok/tok.model --out out/gpu_check/layouts.md
    python benchmarks/gpu_layouts.py ... --dry-run       # print the commands only

Prints (and with ``--out`` writes) a Markdown table with the largest relative difference per
layout; exits 1 when one exceeds ``--tol`` (default 1e-4: fp32, where only the order of
sums differs; TF32 stays off, torch's default). The CPU tests run the same checks with gloo
(tests/parallel/test_layouts.py, 1e-5); this script is for the NCCL path on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {"tp2": ["parallel.tp=2"], "dp2": [], "pp2": ["parallel.pp=2"],
           "tp2_sp": ["parallel.tp=2", "parallel.sp=true"]}


def overrides(args, run_dir: Path) -> list[str]:
    return [f"model.preset={args.preset}", f"model.vocab_size={args.vocab}", "model.n_layers=4",
            f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}", f"data.train={args.train}",
            f"data.tokenizer={args.tokenizer}", f"train.steps={args.steps}", "train.global_batch=8",
            "train.micro_batch=2", "train.warmup_steps=2", "train.dtype=fp32", f"train.device={args.device}",
            "eval.interval=0", "checkpoint.save_final=false", "log.interval=1", "log.progress=none",
            "log.tensorboard=false", f"log.dir={run_dir}"]


def commands(args, root: Path) -> dict[str, list[str]]:
    py = sys.executable
    out = {"single": [py, "-m", "kis_megatron.train", *overrides(args, root / "single")]}
    for name in args.layouts:
        out[name] = [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                     "-m", "kis_megatron.train", *overrides(args, root / name), *LAYOUTS[name]]
    return out


def rows(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", required=True, help="shard prefix of the training data")
    ap.add_argument("--tokenizer", required=True, help="sentencepiece model of the shards")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--layouts", default="tp2,dp2,pp2,tp2_sp", help=f"comma-separated, of {', '.join(LAYOUTS)}")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--vocab", type=int, default=32000, help="model.vocab_size (>= the tokenizer's)")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--out", help="Markdown file to write the table to")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = ap.parse_args(argv)
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    for name in args.layouts:
        if name not in LAYOUTS:
            ap.error(f"--layouts: unknown {name!r}; choose from {', '.join(LAYOUTS)}")
    root = Path("RUN_DIR") if args.dry_run else Path(tempfile.mkdtemp(prefix="gpu_layouts_"))
    cmds = commands(args, root)
    if args.dry_run:
        for name, cmd in cmds.items():
            print(f"{name}: {' '.join(cmd)}")
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    failed = []
    for name, cmd in cmds.items():
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            failed.append(name)
            print(f"{name} failed ({proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
    ref = rows(root / "single") if "single" not in failed else {}
    table = [f"Layouts on {args.device} ({'NCCL' if args.device == 'cuda' else 'gloo'}), fp32, "
             f"{args.steps} steps of preset {args.preset} (4 layers, seq {args.seq}), against one "
             f"process; `python benchmarks/gpu_layouts.py`", "",
             "| layout | max rel. diff loss | max rel. diff grad_norm | within tol |", "|---|---|---|---|"]
    bad = bool(failed)
    for name in args.layouts:
        if name in failed or not ref:
            table.append(f"| {name} | failed | | no |")
            continue
        got = rows(root / name)
        diff = {k: max(abs(got[s][k] - ref[s][k]) / abs(ref[s][k]) for s in ref) for k in ("loss", "grad_norm")}
        ok = sorted(got) == sorted(ref) and max(diff.values()) <= args.tol
        bad |= not ok
        table.append(f"| {name} | {diff['loss']:.1e} | {diff['grad_norm']:.1e} | {'yes' if ok else 'NO'} |")
    text = "\n".join(table) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
