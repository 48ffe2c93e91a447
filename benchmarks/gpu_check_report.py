"""Append the results of ``benchmarks/gpu_check.sh`` to benchmarks/RESULTS.md as one dated
section: device and versions, each part's status, time and command, the kernel tests'
summary and observed errors against float64, the kernel benchmark, the NCCL layout check and
the 125M training throughput.

    python benchmarks/gpu_check_report.py out/gpu_check --results benchmarks/RESULTS.md
    python benchmarks/gpu_check_report.py out/gpu_check --print     # show, append nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path


def environment() -> str:
    try:
        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
        count = torch.cuda.device_count()
        parts = [f"{count} x {dev}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    except ImportError:
        parts = ["torch not importable"]
    for name in ("triton", "liger_kernel"):
        try:
            mod = __import__(name)
            parts.append(f"{name} {getattr(mod, '__version__', '?')}")
        except ImportError:
            parts.append(f"{name} not installed")
    parts.append(f"python {platform.python_version()}")
    return ", ".join(parts)


def _read(path: Path) -> str:
    return path.read_text().strip() if path.is_file() else ""


def kernel_errors(path: Path) -> str:
    """The observed errors (max |error| / max |float64 reference|), one row per op and dtype."""
    if not path.is_file():
        return "(no errors recorded)"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| op | dtype | errors |", "|---|---|---|"]
    for r in rows:
        errs = ", ".join(f"{k} {v:.1e}" for k, v in r.items() if k not in ("op", "dtype"))
        lines.append(f"| {r['op']} | {r['dtype']} | {errs} |")
    return "\n".join(lines)


def report(out: Path) -> str:
    parts = [line.split("\t") for line in _read(out / "parts.tsv").splitlines() if line]
    lines = [f"## GPU check, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- {environment()}", "- command: `bash benchmarks/gpu_check.sh`", "",
             "| part | status | seconds | command |", "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {secs} | `{cmd}` |" for name, status, secs, cmd in parts]
    if not parts:
        lines.append("| (no part ran) | | | |")
    tests_log = _read(out / "kernel_tests.log").splitlines()
    lines += ["", "### Kernel tests on the GPU (bf16 and fp32 against float64)", "",
              f"pytest: {tests_log[-1] if tests_log else '(no log)'}", "",
              kernel_errors(out / "kernel_errors.jsonl")]
    bench = _read(out / "kernel_bench.md")
    lines += ["", "### Kernel benchmark", "", bench.removeprefix("# Kernel benchmark results").strip()
              or "(no result; see kernel_bench.log)"]
    if any(p[0] == "layouts_nccl" for p in parts):
        lines += ["", "### Layouts over NCCL", "", _read(out / "layouts.md") or "(no result; see layouts_nccl.log)"]
    train = [ln for ln in _read(out / "train_125m.log").splitlines() if ln.startswith("|") or ", torch " in ln]
    lines += ["", "### 125M training throughput", "", "\n".join(train) or "(no result; see train_125m.log)"]
    return "\n".join(lines) + "\n"


def append(results: Path, text: str) -> None:
    """Append by writing the whole new file and renaming it (never a half-written file)."""
    old = results.read_text() if results.is_file() else "# Recorded results\n"
    fd, tmp = tempfile.mkstemp(dir=results.parent, prefix=".tmp_", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(old.rstrip("\n") + "\n\n" + text)
    os.replace(tmp, results)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder gpu_check.sh wrote (parts.tsv, logs)")
    ap.add_argument("--results", default="benchmarks/RESULTS.md", help="Markdown file to append to")
    ap.add_argument("--print", action="store_true", help="print the section instead of appending it")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a folder written by benchmarks/gpu_check.sh", file=sys.stderr)
        return 2
    text = report(out)
    if args.print:
        print(text)
    else:
        append(Path(args.results), text)
        print(f"appended the GPU check to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
