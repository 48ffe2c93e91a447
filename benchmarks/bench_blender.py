"""Throughput of the infusion blender: tokens served per second by one process.

Writes a synthetic general shard (a few hundred MB of uint16 tokens, documents of ~600
tokens) and a labelled domain shard (short fact statements of 12-40 tokens, the hard case:
many documents per window) with the real IndexedDatasetWriter into a temp dir, then times
``next_batch`` at realistic shapes (seq_len 2048, global batch 64..512) and at the tiny
CPU ladder's shape (seq_len 64, batch 64). Prints a Markdown table with machine info.

    python benchmarks/bench_blender.py                     # ~2 minutes on 2 cores
    python benchmarks/bench_blender.py --general-mb 50 --out /tmp/r.md

Columns: microseconds per global batch served whole by one process (dp=1), the same for
rank 0 of an 8-way data-parallel run (plan and statistics of the whole batch, windows of
its own eighth only), and the plan + statistics alone (no token reads).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from kis_megatron.data.indexed_dataset import IndexedDataset, IndexedDatasetWriter
from kis_megatron.infusion.blender import InfusionBlender, TokenWindowSource

# (seq_len, global_batch, domain ratios, general shard, preload the general shard?)
SHAPES = [
    (2048, 64, [0.1], "large", None),
    (2048, 256, [0.1], "large", None),
    (2048, 512, [0.1], "large", None),
    (2048, 512, [0.1, 0.05], "large", None),
    (64, 64, [0.3], "large", None),
    (64, 32, [0.3], "statements", True),
    (64, 64, [0.3], "statements", True),
    (64, 64, [0.3], "statements", False),
    (64, 64, [0.2, 0.1], "statements", True),
]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_shard(prefix: str, lengths: np.ndarray, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 32000, int(lengths.sum()), dtype=np.uint16)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    with IndexedDatasetWriter(prefix, np.uint16) as w:
        for a, b in zip(bounds[:-1], bounds[1:]):
            w.add_document(tokens[a:b])


def build_shards(tmp: str, general_mb: float, seed: int):
    """large: ~general_mb MB of ~600-token documents (streamed: above the preload limit);
    statements: 5M tokens of 12-40-token documents, like the tiny ladder's general world;
    domain: 200k fact statements of 12-40 tokens over 50k facts (auto preloaded)."""
    rng = np.random.default_rng(seed)
    n_large = int(general_mb * 1e6 / 2 / 600)
    large = np.clip(rng.lognormal(np.log(500), 0.6, n_large), 16, 8192).astype(np.int64)
    n_facts = 50_000
    t0 = time.perf_counter()
    write_shard(os.path.join(tmp, "large"), large, seed)
    write_shard(os.path.join(tmp, "statements"), rng.integers(12, 41, 200_000), seed + 1)
    write_shard(os.path.join(tmp, "domain"), rng.integers(12, 41, 4 * n_facts), seed + 2)
    labels = np.arange(4 * n_facts, dtype=np.int64) % n_facts
    return labels, time.perf_counter() - t0


def make_blender(tmp, labels, seq_len, batch, ratios, general="large", preload=None, seed=0):
    general = TokenWindowSource(IndexedDataset(os.path.join(tmp, general)), seq_len, seed,
                                "general", preload=preload)
    domains = [TokenWindowSource(IndexedDataset(os.path.join(tmp, "domain")), seq_len, seed,
                                 f"facts{i}", labels) for i in range(len(ratios))]
    return InfusionBlender(general, domains, ratios, seq_len, batch, seed, 1_000_000)


def time_calls(fn, seconds: float) -> tuple[float, float]:
    """(best, median) seconds per call over bursts of ~20 ms for about ``seconds``.

    The best burst is the figure to compare (it filters out other processes on a shared
    machine); the median shows how much such contention there was.
    """
    fn()  # warm-up: epoch layouts, page cache
    t0 = time.perf_counter()
    fn()
    per_burst = max(1, int(0.02 / max(time.perf_counter() - t0, 1e-6)))
    means, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(means) < 5:
        t0 = time.perf_counter()
        for _ in range(per_burst):
            fn()
        means.append((time.perf_counter() - t0) / per_burst)
    return min(means), statistics.median(means)


def plan_only(blender):
    """One step of plan + exposure statistics without reading tokens (index arithmetic)."""
    def step():
        plan = blender._plan()
        taken = np.bincount(plan, minlength=len(blender.sources))
        for name, (idx, cut) in blender._count_exposures(taken).items():
            blender._expo[name].add(idx, cut)
        blender._samples = [c + int(m) for c, m in zip(blender._samples, taken)]
        blender.step += 1
    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--general-mb", type=float, default=300.0, help="size of the general shard")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per measurement repeat")
    ap.add_argument("--out", help="also write the Markdown to this file (atomically)")
    args = ap.parse_args(argv)
    if args.general_mb <= 0 or args.seconds <= 0:
        print("error: --general-mb and --seconds must be positive", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    lines = [
        "## Infusion blender throughput",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs visible, {platform.system()}",
        f"- python {platform.python_version()}, numpy {np.__version__}",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        labels, write_s = build_shards(tmp, args.general_mb, seed=0)
        g = IndexedDataset(os.path.join(tmp, "large"))
        lines += [
            f"- general 'large': {g.num_tokens / 1e6:.0f}M uint16 tokens "
            f"({os.path.getsize(os.path.join(tmp, 'large.bin')) / 1e6:.0f} MB, {len(g)} documents "
            f"of ~{g.num_tokens / len(g):.0f} tokens, read with one get() per document); "
            "general 'statements': 200k documents of 12-40 tokens (5M tokens); domain: 200k "
            f"fact statements of 12-40 tokens over {labels.max() + 1} facts, preloaded; "
            f"shards written in {write_s:.1f} s",
            f"- best / median of ~20 ms bursts over {args.seconds:g} s per cell, after a warm-up",
            "",
            "| seq_len | global batch | domain ratios | general shard | us/batch dp=1 (best / median) "
            "| tokens/s dp=1 | us/batch rank 0 of dp=8 | us plan+stats only |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for seq_len, batch, ratios, general, preload in SHAPES:
            def make():
                return make_blender(tmp, labels, seq_len, batch, ratios, general, preload)

            whole, rank = make(), make()
            t1, m1 = time_calls(whole.next_batch, args.seconds)
            t8, _ = time_calls(lambda: rank.next_batch(0, 8), args.seconds)
            tp, _ = time_calls(plan_only(make()), args.seconds)
            kind = f"{general}, {'preloaded' if whole.sources[0]._flat is not None else 'streamed'}"
            row = (f"| {seq_len} | {batch} | {', '.join(map(str, ratios))} | {kind} "
                   f"| {t1 * 1e6:,.0f} / {m1 * 1e6:,.0f} | {batch * seq_len / t1 / 1e6:,.1f}M "
                   f"| {t8 * 1e6:,.0f} | {tp * 1e6:,.0f} |")
            lines.append(row)
            print(row, flush=True)
    lines.insert(5, f"- load average (1 min) before / after: {load_before:.1f} / "
                    f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if args.out:
        tmp_path = f"{args.out}.tmp{os.getpid()}"
        with open(tmp_path, "w") as f:
            f.write(text)
        os.replace(tmp_path, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
