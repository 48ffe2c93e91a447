"""The report of ``benchmarks/gpu_check.sh``: one Markdown section with the device and
versions (the preflight), each part's status, time, command and last line, the kernel tests'
observed errors against float64, the kernel benchmark, the NCCL layout check and the 125M
training throughput. gpu_check.sh rewrites ``$OUT/report.md`` with it after every part;
back on a machine that keeps files, ``--results`` appends it to benchmarks/RESULTS.md.

    python3 benchmarks/gpu_check_report.py out/gpu_check                  # -> out/gpu_check/report.md
    python3 benchmarks/gpu_check_report.py FOLDER --results benchmarks/RESULTS.md
    python3 benchmarks/gpu_check_report.py FOLDER --print                 # show, write nothing
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
from pathlib import Path

TITLES = {"gpu": "GPU check", "cpu": "GPU check rehearsed on CPU (bare-box versions; not GPU figures)"}


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


def _cell(text: str) -> str:
    return text.replace("|", "/").strip()


def report(out: Path, mode: str = "gpu") -> str:
    parts = [line.split("\t") for line in _read(out / "parts.tsv").splitlines() if line]
    parts = [p + [""] * (5 - len(p)) for p in parts]
    flag = "--cpu" if mode == "cpu" else ""
    lines = [f"## {TITLES[mode]}, {datetime.datetime.now().isoformat(timespec='seconds')}", "",
             f"- command: `{' '.join(['bash benchmarks/gpu_check.sh', flag]).strip()}`", "",
             _read(out / "preflight.md") or "(no preflight)", "",
             "| part | status | seconds | command | last line |", "|---|---|---|---|---|"]
    lines += [f"| {n} | {s} | {t} | `{_cell(c)}` | {_cell(last)} |" for n, s, t, c, last in parts]
    if not parts:
        lines.append("| (no part ran) | | | | |")
    done = {p[0] for p in parts}
    lines += ["", "### Kernel tests (bf16 and fp32 against float64)", "",
              kernel_errors(out / "kernel_errors.jsonl")]
    bench = _read(out / "kernel_bench.md").removeprefix("# Kernel benchmark results").strip()
    lines += ["", "### Kernel benchmark", "", bench or "(no result yet; see check.log)"]
    if "layouts_nccl" in done:
        lines += ["", "### Layouts over NCCL", "", _read(out / "layouts.md") or "(no result; see check.log)"]
    lines += ["", "### 125M training throughput", "", _read(out / "train.md") or "(no result yet; see check.log)"]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> None:
    """Through a temporary file and a rename: never a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the folder gpu_check.sh wrote (parts.tsv, preflight.md, ...)")
    ap.add_argument("--mode", choices=tuple(TITLES), default="gpu", help="cpu: a rehearsal's report")
    ap.add_argument("--results", help="append the section to this Markdown file instead")
    ap.add_argument("--print", action="store_true", help="print the section, write nothing")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        print(f"error: {out} is not a folder written by benchmarks/gpu_check.sh", file=sys.stderr)
        return 2
    text = report(out, args.mode)
    if args.print:
        print(text)
    elif args.results:
        results = Path(args.results)
        old = results.read_text() if results.is_file() else "# Recorded results\n"
        _write(results, old.rstrip("\n") + "\n\n" + text)
        print(f"appended the GPU check to {results}")
    else:
        _write(out / "report.md", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
