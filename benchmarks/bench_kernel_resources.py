"""Registers and shared memory of every Triton kernel, compiled for real GPU targets without
a GPU, at the launch configurations the launchers choose for the shipped presets.

    python benchmarks/bench_kernel_resources.py                 # Markdown table (RESULTS.md)
    python benchmarks/bench_kernel_resources.py --json --check  # one JSON line per compile;
                                                                # exit 1 on any problem

Presets 125m-7b, vocabularies 32000 and 128256, tensor-parallel sizes 1, 2, 4, 8 where they
split the model evenly, data in bf16 and fp32, targets sm_80, sm_90 and sm_100
(``kis_kernels.aot``: compile through Triton and its ptxas, resources read from the cubin,
results cached). Launches that compile to the same code are compiled once.
Run it with ``TRITON_INTERPRET`` unset: the interpreter cannot compile.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

if __name__ == "__main__":  # scripts get their folder first on sys.path; the repo comes first
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from kis_kernels.aot import TARGETS, compile_launch, cuda_compiler_available, op_launches, problems  # noqa: E402
from kis_megatron.model.presets import kernel_shapes  # noqa: E402

DTYPES = ("bf16", "fp32")


def all_launches() -> list:
    """Distinct launches over presets x vocabularies x tp sizes x dtypes, in a stable order."""
    seen = {}
    for shape in kernel_shapes():
        for dtype in DTYPES:
            for launch in op_launches(**shape, dtype=dtype):
                seen.setdefault(launch, None)
    return list(seen)


def table(results: list[tuple], archs: list[int]) -> str:
    """Markdown: one row per kernel and compile-time configuration, a column per target and
    dtype with registers per thread / shared memory bytes (the worst over the integer
    specialisation variants of that configuration)."""
    rows: dict[tuple, dict] = {}
    for launch, arch, res, _ in results:
        key = (launch.kernel.strip("_"), launch.constexprs, launch.num_warps)
        cell = rows.setdefault(key, {}).setdefault((arch, launch.dtype), [0, 0])
        cell[0] = max(cell[0], res["regs"])
        cell[1] = max(cell[1], res["shared"] + res["static_shared"])
    cols = [(a, d) for a in archs for d in DTYPES]
    head = "| kernel | constants | warps | " + " | ".join(f"sm_{a} {d}" for a, d in cols) + " |"
    lines = [head, "|" + "---|" * (3 + len(cols))]
    for (kernel, consts, warps), cells in sorted(rows.items()):
        vals = [f"{cells[c][0]} / {cells[c][1]}" if c in cells else "" for c in cols]
        consts = ", ".join(f"{k}={v}" for k, v in consts)
        lines.append(f"| {kernel} | {consts} | {warps} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", default="80,90,100", help="compute capabilities (default 80,90,100)")
    ap.add_argument("--json", action="store_true", help="one JSON object per compile instead of the table")
    ap.add_argument("--check", action="store_true", help="exit 1 when any compile has a problem")
    args = ap.parse_args(argv)
    archs = [int(a) for a in args.archs.split(",")]
    for a in archs:
        if a not in TARGETS:
            ap.error(f"--archs: {a} is not one of {sorted(TARGETS)}")
    why = cuda_compiler_available()
    if why:
        print(f"SKIP: triton's CUDA compiler is not available: {why}")
        return 0
    import triton
    import torch

    results, bad = [], 0
    for arch in archs:
        for launch in all_launches():
            try:
                res = compile_launch(launch, arch)
                found = problems(res, arch)
            except Exception as e:  # a compile error is a finding, reported with the launch
                res, found = None, [f"compile error: {type(e).__name__}: {str(e)[-1500:]}"]
            bad += bool(found)
            if args.json:
                print(json.dumps({"arch": arch, "launch": launch.label(), "resources": res,
                                  "problems": found}), flush=True)
            if res is not None:
                results.append((launch, arch, res, found))
            elif not args.json:
                print(f"sm_{arch} {launch.label()}: {found[0]}", file=sys.stderr)
    if not args.json:
        print(f"Kernel resources, compiled without a GPU ({datetime.date.today()}; triton "
              f"{triton.__version__}, torch {torch.__version__}, python {platform.python_version()}; "
              f"`python benchmarks/bench_kernel_resources.py`). Each cell: registers per thread / "
              f"shared memory bytes (static + dynamic), the worst over launches of that configuration; "
              f"{len(results)} compiles, {bad} with problems (spills, register file, shared memory).\n")
        print(table(results, archs))
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
