"""Speed and memory of the kis-megatron kernels against PyTorch eager, torch.compile,
Liger-Kernel and apex (the last two when importable).

For each op it times forward + backward (median of CUDA-event timings, L2 flushed before
each repetition), records the peak memory allocated during one step beyond the inputs,
checks the forward output against the PyTorch reference, and reports achieved GB/s (the
ideal bytes an op must move, divided by its time) next to the device-to-device copy
bandwidth measured in the same run; for the compute-bound linear_cross_entropy it
reports TFLOP/s (6 * tokens * hidden * vocab per step) instead.

    python benchmarks/bench_kernels.py --out benchmarks/RESULTS.md      # GPU, bf16
    python benchmarks/bench_kernels.py --device cpu                              # smoke check only
    KIS_KERNELS=triton TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --device cpu
                                                         # smoke check of the Triton code

CPU numbers are only a check that the script runs (tiny shapes, the reference path or
Triton's interpreter); they say nothing about the kernels' speed.
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
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

import kis_kernels

GPU_SHAPES = {
    "tokens": 8192,  # batch 2 x seq 4096
    "rms_hidden": (2048, 4096, 8192),
    "rope": (2, 4096, 32, 8, 128),  # batch, seq, q heads, kv heads, head_dim
    "swiglu_inter": 14336,
    "ce_hidden": 4096,
    "ce_vocab": (32000, 128256),
}
CPU_SHAPES = {
    "tokens": 64,
    "rms_hidden": (96,),
    "rope": (1, 16, 4, 2, 64),
    "swiglu_inter": 80,
    "ce_hidden": 48,
    "ce_vocab": (1000,),
}


@dataclass
class Case:
    """One op at one shape: named implementations, each a builder returning
    (step inputs that get gradients, a function producing the outputs)."""

    op: str
    shape: str
    impls: dict[str, Callable[[], tuple[list[torch.Tensor], Callable[[], object]]]]
    reference: Callable[[], object]  # fp32 forward output(s) to check against
    bytes_moved: float = 0.0  # ideal HBM traffic of forward + backward
    flops: float = 0.0  # for compute-bound ops


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _optional(name: str):
    try:
        return __import__(name, fromlist=["_"])
    except Exception:  # not installed, or broken: the benchmark goes on without it
        return None


def _impl(fn, *tensors):
    """A builder: fresh leaf copies of ``tensors`` and a thunk running ``fn`` on them."""
    leaves = [_leaf(t) for t in tensors]
    return leaves, lambda: fn(*leaves)


def build_cases(device: str, dtype: torch.dtype, shapes: dict, use_compile: bool) -> list[Case]:
    """All benchmark cases at the given shapes."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    el = torch.empty((), dtype=dtype).element_size()
    liger = _optional("liger_kernel.transformers.functional")
    apex_norm = _optional("apex.normalization")
    compiled = {}

    def compile_(fn):
        if fn not in compiled:
            compiled[fn] = torch.compile(fn)
        return compiled[fn]

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    cases = []
    T = shapes["tokens"]
    for H in shapes["rms_hidden"]:
        x, w = rand(T, H), rand(H, scale=0.1) + 1.0
        impls = {
            "ours": partial(_impl, kis_kernels.rms_norm, x, w),
            "torch eager": partial(_impl, kis_kernels.rms_norm_reference, x, w),
        }
        if use_compile:
            impls["torch.compile"] = partial(_impl, compile_(kis_kernels.rms_norm_reference), x, w)
        if liger is not None:
            impls["liger"] = partial(_impl, lambda a, b: liger.liger_rms_norm(a, b, 1e-6), x, w)
        if apex_norm is not None:
            def apex_impl(x=x, w=w):
                mod = apex_norm.FusedRMSNorm(w.shape[0], eps=1e-6).to(device=device, dtype=dtype)
                with torch.no_grad():
                    mod.weight.copy_(w)
                a = _leaf(x)
                return [a, mod.weight], lambda: mod(a)
            impls["apex"] = apex_impl
        cases.append(Case("rms_norm", f"{T}x{H}", impls,
                          partial(kis_kernels.rms_norm_reference, x.float(), w.float()),
                          bytes_moved=5 * T * H * el))

    B, S, HQ, HKV, D = shapes["rope"]
    q, k = rand(B, S, HQ, D), rand(B, S, HKV, D)
    theta = torch.arange(S, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(D // 2) / (D // 2))
    cos, sin = theta.cos().float().to(device), theta.sin().float().to(device)

    def q_and_k(fn):
        return lambda a, b: (fn(a, cos, sin), fn(b, cos, sin))

    impls = {
        "ours": partial(_impl, q_and_k(kis_kernels.rope), q, k),
        "torch eager": partial(_impl, q_and_k(kis_kernels.rope_reference), q, k),
    }
    if use_compile:
        impls["torch.compile"] = partial(_impl, q_and_k(compile_(kis_kernels.rope_reference)), q, k)
    if liger is not None:
        # Liger takes (batch, heads, seq, head_dim) and full-width cos/sin (1, seq, head_dim);
        # its outputs are transposed back so the check compares like with like.
        cos_full = torch.cat((cos, cos), -1)[None].to(dtype)
        sin_full = torch.cat((sin, sin), -1)[None].to(dtype)

        def liger_rope(a, b):
            qo, ko = liger.liger_rope(a, b, cos_full, sin_full)
            return qo.transpose(1, 2), ko.transpose(1, 2)

        impls["liger"] = partial(_impl, liger_rope, q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous())
    n = B * S * (HQ + HKV) * D
    cases.append(Case("rope q+k", f"{B}x{S}x({HQ}+{HKV})x{D}", impls,
                      lambda: (kis_kernels.rope_reference(q.float(), cos, sin), kis_kernels.rope_reference(k.float(), cos, sin)),
                      bytes_moved=4 * n * el))

    inter = shapes["swiglu_inter"]
    g, u = rand(T, inter, scale=2.0), rand(T, inter)
    impls = {
        "ours": partial(_impl, kis_kernels.swiglu, g, u),
        "torch eager": partial(_impl, lambda a, b: F.silu(a) * b, g, u),
    }
    if use_compile:
        impls["torch.compile"] = partial(_impl, compile_(kis_kernels.swiglu_reference), g, u)
    if liger is not None:
        impls["liger"] = partial(_impl, liger.liger_swiglu, g, u)
    cases.append(Case("swiglu", f"{T}x{inter}", impls,
                      partial(kis_kernels.swiglu_reference, g.float(), u.float()),
                      bytes_moved=8 * T * inter * el))

    Hc = shapes["ce_hidden"]
    for V in shapes["ce_vocab"]:
        hid, wt = rand(T, Hc), rand(V, Hc, scale=Hc**-0.5)
        tgt = torch.randint(0, V, (T,), generator=gen)
        tgt[::17] = -100
        tgt = tgt.to(device)

        def with_target(fn, tgt=tgt):
            return lambda a, b: fn(a, b, tgt)

        impls = {
            "ours": partial(_impl, with_target(kis_kernels.linear_cross_entropy), hid, wt),
            "torch eager (full logits)": partial(_impl, with_target(kis_kernels.linear_cross_entropy_naive), hid, wt),
            "torch chunked reference": partial(_impl, with_target(kis_kernels.linear_cross_entropy_reference), hid, wt),
        }
        if use_compile:
            impls["torch.compile (full logits)"] = partial(
                _impl, with_target(compile_(kis_kernels.linear_cross_entropy_naive)), hid, wt)
        if liger is not None:
            impls["liger"] = partial(_impl, with_target(liger.liger_fused_linear_cross_entropy), hid, wt)
        cases.append(Case("linear_cross_entropy", f"{T}x{Hc}, V={V}", impls,
                          partial(kis_kernels.linear_cross_entropy_reference, hid.float(), wt.float(), tgt),
                          flops=6.0 * T * Hc * V))
    return cases


class Timer:
    """Median wall time of a callable: CUDA events with an L2 flush, or perf_counter on CPU."""

    def __init__(self, device: str, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=device) if device == "cuda" else None

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device == "cuda":
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def copy_bandwidth(device: str, timer: Timer) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written per second)."""
    nbytes = 2**30 if device == "cuda" else 2**24
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _rel_err(got, want) -> float:
    err = 0.0
    for a, b in zip(_outputs(got), _outputs(want)):
        a, b = a.detach().double(), b.detach().double()
        err = max(err, ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item())
    return err


def run_case(case: Case, name: str, timer: Timer, device: str, copy_bw: float) -> dict:
    """Time one implementation of one case; errors become a row that says so."""
    row = {"op": case.op, "shape": case.shape, "impl": name}
    try:
        leaves, fn = case.impls[name]()
        with torch.no_grad():
            want = case.reference()
        first = fn()
        row["err"] = _rel_err(first, want)
        grads = [torch.randn_like(o) for o in _outputs(first)]

        def step():
            for t in leaves:
                t.grad = None
            torch.autograd.backward(_outputs(fn()), grads)

        step()
        if device == "cuda":
            for t in leaves:  # the baseline holds the inputs only, not last step's gradients
                t.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            row["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        row["ms"] = timer(step)
        if case.bytes_moved:
            gbs = case.bytes_moved / (row["ms"] * 1e-3) / 1e9
            row["throughput"] = f"{gbs:.0f} GB/s ({100 * gbs / copy_bw:.0f}% of copy)"
        elif case.flops:
            row["throughput"] = f"{case.flops / (row['ms'] * 1e-3) / 1e12:.1f} TFLOP/s"
    except Exception as e:  # one broken optional library must not stop the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def render(rows: list[dict], header: list[str]) -> str:
    lines = header + [
        "",
        "| op | shape | impl | fwd+bwd ms | peak extra MiB | throughput | max rel err (fwd) |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['op']} | {r['shape']} | {r['impl']} | error: {r['error']} | | | |")
            continue
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "n/a"
        lines.append(
            f"| {r['op']} | {r['shape']} | {r['impl']} | {r['ms']:.3f} | {peak} | "
            f"{r.get('throughput', '')} | {r['err']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def write_atomically(path: str, old: str, text: str) -> None:
    """Write ``old`` followed by ``text`` to ``path`` through a temporary file and a rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".md")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(old.rstrip("\n") + "\n\n" + text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _dist_version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module.replace("_", "-"))
    except metadata.PackageNotFoundError:
        return "?"


def versions() -> str:
    parts = [f"torch {torch.__version__}"]
    for name in ("triton", "liger_kernel", "apex"):
        mod = _optional(name)
        if mod is not None:
            parts.append(f"{name} {getattr(mod, '__version__', None) or _dist_version(name)}")
    return ", ".join(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--out", help="Markdown file to append the results to")
    p.add_argument("--ops", default="", help="comma-separated op names to keep (default: all)")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="include torch.compile of the references (default: on for cuda)")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 30 cuda, 3 cpu)")
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: CUDA is not available; use --device cpu for a smoke run", file=sys.stderr)
        return 2
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        print(f"error: the folder of --out {args.out} does not exist", file=sys.stderr)
        return 2
    on_gpu = args.device == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32  # the interpreter has no bf16
    use_compile = on_gpu if args.compile is None else args.compile
    timer = Timer(args.device, warmup=5 if on_gpu else 1, reps=args.reps or (30 if on_gpu else 3))
    cases = build_cases(args.device, dtype, GPU_SHAPES if on_gpu else CPU_SHAPES, use_compile)
    wanted = {o.strip() for o in args.ops.split(",") if o.strip()}
    unknown = wanted - {c.op for c in cases}
    if unknown:
        print(f"error: unknown --ops {sorted(unknown)}; choose from {sorted({c.op for c in cases})}",
              file=sys.stderr)
        return 2

    bw = copy_bandwidth(args.device, timer)
    probe = torch.empty(1, device=args.device)
    ours = "triton" if kis_kernels.use_triton(probe) else "torch reference"
    device_name = torch.cuda.get_device_name() if on_gpu else platform.processor() or "cpu"
    header = [
        f"## {datetime.datetime.now().isoformat(timespec='seconds')} on {device_name}",
        "",
        f"- {versions()}; dtype {str(dtype).replace('torch.', '')}; `ours` ran {ours} "
        f"(KIS_KERNELS={os.environ.get('KIS_KERNELS', 'auto')})",
        f"- measured device-to-device copy bandwidth: {bw:.0f} GB/s",
        "- times: median forward + backward; peak: memory allocated during one step beyond inputs",
    ]
    if not on_gpu:
        header.append("- CPU smoke run with tiny shapes: these numbers do not measure the kernels")
    rows = []
    before = ""
    if args.out:
        before = open(args.out).read() if os.path.exists(args.out) else "# Kernel benchmark results\n"
    for case in cases:
        if wanted and case.op not in wanted:
            continue
        for name in case.impls:
            rows.append(run_case(case, name, timer, args.device, bw))
            print(f"{case.op} {case.shape} {name}: "
                  f"{rows[-1].get('ms', rows[-1].get('error'))}", file=sys.stderr, flush=True)
            if args.out:  # every row as it finishes: a time limit loses only the rows not run
                write_atomically(args.out, before, render(rows, header))
    text = render(rows, header)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
