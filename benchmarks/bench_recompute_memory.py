"""Activation memory of one training micro-batch on CPU for each ``train.recompute`` mode,
measured exactly (``LiveTensorBytes``: bytes of tensor storages created and alive), next to
the planner's estimate (``kis_megatron.plan.activation_bytes``), with the step time.

    python benchmarks/bench_recompute_memory.py            # Markdown rows for RESULTS.md
    python benchmarks/bench_recompute_memory.py --dim 256 --layers 4 --seq 256 --batch 2

Columns: kept = bytes saved for the backward at the end of a micro-batch's forward (what
recomputation reduces); peak = the most alive during the forward and backward of the second
of two accumulated micro-batches (so the first one's gradients are alive, as in any step
with accumulation); the planner's kept, and its activations + gradients.
The CPU runs the PyTorch reference ops (fp32); SDPA uses its CPU flash kernel, which keeps
only the output and log-sum-exp, so ``selective`` saves little here (see
kis_megatron/parallel/recompute.py).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import platform
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # scripts get their folder first on sys.path; the repo comes first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from kis_megatron import plan as P  # noqa: E402
from kis_megatron.config import load_config  # noqa: E402
from kis_megatron.parallel.parallelize import build_model  # noqa: E402
from kis_megatron.parallel.recompute import apply_recompute  # noqa: E402
from kis_megatron.training.memory import accumulated_microbatch_bytes  # noqa: E402

MB = 2**20


def measure(overrides: list[str], mode: str, repeats: int) -> dict:
    cfg = load_config(None, overrides + [f"train.recompute={mode}"])
    model = build_model(cfg.model, seed=0)
    apply_recompute(model, mode)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch, cfg.data.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        model.zero_grad(set_to_none=True)
        gc.collect()
        t0 = time.perf_counter()
        if i == 0:  # the measured step (the tracker slows it down; timed steps run without it)
            # Two micro-batches of accumulation: the second runs with the first's gradients
            # alive, the case the planner's total (gradients + activations) describes.
            kept, peak = accumulated_microbatch_bytes(model, tokens)
            continue
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        times.append(time.perf_counter() - t0)
    layout = P.resolve_layout(cfg, 1)
    est = P.activation_bytes(cfg, layout, P.stage_parameters(cfg, layout)[0], cuda=False, bf16=False)
    grads = sum(p.grad.nbytes for p in model.parameters())
    return {"mode": mode, "kept": kept, "peak": peak, "plan_kept": est["per_microbatch"],
            "plan_peak": est["per_microbatch"] + est["transient"] + grads,
            "step_s": statistics.median(times) if times else float("nan"), "params": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per mode (median)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = [f"model.dim={args.dim}", f"model.n_layers={args.layers}", f"model.n_heads={args.heads}",
                 f"model.vocab_size={args.vocab}", f"model.max_seq_len={args.seq}", f"data.seq_len={args.seq}",
                 f"train.micro_batch={args.batch}", f"train.global_batch={args.batch}"]
    rows = [measure(overrides, mode, args.repeats) for mode in ("none", "selective", "full")]
    import os

    print(f"- date {datetime.date.today()}; {platform.machine()} CPU, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, python "
          f"{platform.python_version()}; fp32, reference ops")
    print(f"- model dim {args.dim} x {args.layers} layers, {args.heads} heads, vocab {args.vocab} "
          f"({rows[0]['params'] / 1e6:.1f}M parameters); micro-batch {args.batch} x {args.seq} tokens")
    print(f"- command: `python benchmarks/bench_recompute_memory.py {' '.join(argv or sys.argv[1:])}`".rstrip())
    print()
    print("| train.recompute | kept for backward (MiB) | peak fwd+bwd, with gradients (MiB) | planner kept (MiB) | "
          "planner activations + gradients (MiB) | fwd+bwd of one micro-batch (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['kept'] / MB:.1f} | {r['peak'] / MB:.1f} | {r['plan_kept'] / MB:.1f} | "
              f"{r['plan_peak'] / MB:.1f} | {r['step_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
