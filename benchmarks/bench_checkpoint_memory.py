"""Memory of a tensor-parallel checkpoint save (and load) at tp=2 on CPU (gloo), against the
bytes of the parameters: the shard-native save (each rank hands DCP its shards as DTensors)
next to the previous scheme (all-gather every shard into full tensors, then save; load into
full-size buffers, then slice), run in the same processes on the same model and state.

    python benchmarks/bench_checkpoint_memory.py                 # launches 2 ranks itself
    python benchmarks/bench_checkpoint_memory.py --dim 512 --layers 4

Per rank: parameter and AdamW-state bytes it holds; during the save, the peak bytes of
tensors allocated (``LiveTensorBytes``: what torch allocates, exact) and the peak rise of the
process's resident memory (sampled every millisecond from /proc; includes file buffers and
allocator slack, so it is noisier).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

if __name__ == "__main__":  # scripts get their folder first on sys.path; the repo comes first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

MB = 2**20


class PeakRSS:
    """Peak resident set size of this process while active, sampled every millisecond."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def worker(args) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from kis_megatron.config import ModelConfig, TrainConfig
    from kis_megatron.parallel.parallelize import build_model
    from kis_megatron.parallel.tensor_parallel import apply_tp, full_of, shard_of
    from kis_megatron.training import checkpoint as ck
    from kis_megatron.training.memory import LiveTensorBytes
    from kis_megatron.training.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, group = dist.get_rank(), dist.group.WORLD
    cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads)
    model = build_model(cfg, seed=0, parallelize=lambda m: apply_tp(m, group))
    opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    params = sum(p.nbytes for p in model.parameters())
    state = sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    root = Path(args.dir)

    def measure(save) -> dict:
        dist.barrier()
        with PeakRSS() as rss, LiveTensorBytes() as mem:
            save()
        dist.barrier()
        return {"tensor_peak": mem.peak, "rss_rise": rss.peak - rss.start}

    def gathered():  # the previous scheme, as checkpoint.py did it before shard-native saves
        msd, osd = get_state_dict(model, opt, options=ck._FLAT)
        msd, osd = dict(msd), dict(osd)
        for container, key, dim in list(ck._sharded_entries(model, msd, osd)):
            container[key] = full_of(container[key], dim, group)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(root / "gathered"))

    def gathered_load():  # the previous scheme: full-size buffers, then this rank's slice
        msd, osd = get_state_dict(model, opt, options=ck._FLAT)
        state = {"model": dict(msd), "optim": dict(osd)}
        sharded = list(ck._sharded_entries(model, state["model"], state["optim"]))
        for container, key, dim in sharded:
            shape = list(container[key].shape)
            shape[dim] *= dist.get_world_size(group)
            container[key] = container[key].new_empty(shape)
        dcp.load(state, checkpoint_id=str(root / "gathered"))
        for container, key, dim in sharded:
            container[key] = shard_of(container[key], dim, group)

    manager = ck.CheckpointManager(root / "sharded", keep=1, tp_group=group)
    results = {"rank": rank, "params": params, "optimizer": state}
    results["sharded"] = measure(lambda: manager.save(1, model, opt, {}))
    results["gathered"] = measure(gathered)
    results["sharded_load"] = measure(lambda: manager.load(root / "sharded" / "step_00000001", model, opt))
    results["gathered_load"] = measure(gathered_load)
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, results)
    if rank == 0:
        Path(args.result).write_text(json.dumps(out))
    dist.destroy_process_group()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(Path(__file__).resolve()), "--worker", "--dir", tmp, "--result", str(result),
               "--dim", str(args.dim), "--layers", str(args.layers), "--heads", str(args.heads),
               "--vocab", str(args.vocab)]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows = json.loads(result.read_text())
    print(f"- date {datetime.date.today()}; {platform.machine()} CPU, 2 ranks (gloo, torchrun), 1 thread each; "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"- model dim {args.dim} x {args.layers} layers, {args.heads} heads, vocab {args.vocab}, untied, "
          f"fp32, tp=2; AdamW state after one step")
    print(f"- command: `python benchmarks/bench_checkpoint_memory.py {' '.join(argv or sys.argv[1:])}`".rstrip())
    print()
    print("| rank | parameters held (MiB) | AdamW state (MiB) | operation | tensor bytes allocated, peak (MiB) | "
          "resident memory rise, peak (MiB) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        for scheme, label in (("sharded", "save, shard-native (DTensor)"), ("gathered", "save, gather to full (before)"),
                              ("sharded_load", "load, shard-native"), ("gathered_load", "load, full buffers (before)")):
            print(f"| {r['rank']} | {r['params'] / MB:.0f} | {r['optimizer'] / MB:.0f} | {label} | "
                  f"{r[scheme]['tensor_peak'] / MB:.1f} | {r[scheme]['rss_rise'] / MB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
