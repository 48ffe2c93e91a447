"""What can be checked on CPU of the one GPU check (benchmarks/gpu_check.sh), which has not
run on a GPU: the shell script parses and its dry run names every part and existing files;
the Python parts parse their arguments; the NCCL layout script runs for real with gloo; the
report appends a section built from a real CPU run of the GPU kernel tests' harness."""

import os
import re
import subprocess
import sys

import pytest

from _corpus import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*cmd, env=None, timeout=300):
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_script_parses_and_dry_run_lists_every_part(tmp_path):
    assert run("bash", "-n", str(SCRIPT)).returncode == 0
    one = run("bash", str(SCRIPT), "--dry-run", env={"NGPU": "1", "OUT": str(tmp_path / "never")})
    assert one.returncode == 0, one.stderr
    names = re.findall(r"^(\w+)\s+\(cap\s+(\d+)s\)", one.stdout, re.M)
    assert [n for n, _ in names] == ["kernel_tests", "data", "kernel_bench", "train_125m"]
    assert sum(int(c) for _, c in names) <= 480  # under 8 minutes on one GPU, by the caps
    two = run("bash", str(SCRIPT), "--dry-run", env={"NGPU": "2"})
    assert "layouts_nccl" in two.stdout and "NPROCS=2" in two.stdout
    for path in re.findall(r"(?:tests|benchmarks|examples)/[\w/]+\.(?:py|sh)", two.stdout):
        assert (ROOT / path).is_file(), path
    assert not (tmp_path / "never").exists()  # a dry run writes nothing


def test_python_parts_parse_their_arguments():
    for script in ("bench_kernels.py", "gpu_layouts.py", "gpu_check_report.py", "bench_kernel_resources.py"):
        proc = run(sys.executable, str(ROOT / "benchmarks" / script), "--help")
        assert proc.returncode == 0 and "usage" in proc.stdout, (script, proc.stderr)
    bad = run(sys.executable, str(ROOT / "benchmarks" / "gpu_layouts.py"), "--train", "x", "--tokenizer", "y",
              "--layouts", "tp3")
    assert bad.returncode == 2 and "unknown 'tp3'" in bad.stderr


@pytest.mark.slow
@pytest.mark.multiprocess
def test_layout_script_runs_with_gloo(world_corpus, tmp_path):
    """The NCCL check's logic for real, on CPU (gloo): tp=2 against one process."""
    out = tmp_path / "layouts.md"
    proc = run(sys.executable, str(ROOT / "benchmarks" / "gpu_layouts.py"), "--device", "cpu",
               "--layouts", "tp2", "--vocab", "400", "--steps", "3", "--train", world_corpus["shards"]["general"],
               "--tokenizer", world_corpus["tokenizer"], "--out", str(out), env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert re.search(r"\| tp2 \| \S+ \| \S+ \| yes \|", out.read_text()), out.read_text()


@pytest.mark.slow
def test_report_appends_a_dated_section(tmp_path):
    out = tmp_path / "gpu_check"
    out.mkdir()
    errors = out / "kernel_errors.jsonl"
    # The GPU kernel tests' own harness, its CPU (interpreter) variant, records real errors.
    tests = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/kernels/test_kernels_gpu.py", env={"KIS_GPU_ERRORS": str(errors)})
    assert tests.returncode == 0, tests.stdout[-2000:]
    (out / "kernel_tests.log").write_text(tests.stdout)
    (out / "parts.tsv").write_text("kernel_tests\tok\t12\tpytest ...\ntrain_125m\ttimed out after 120s\t120\tbash x\n")
    (out / "train_125m.log").write_text("noise\nNVIDIA H200, torch 2.13, preset 125m\n| processes | tokens/s |\n| 1 | 5 |\n")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Recorded results\n\nearlier\n")
    proc = run(sys.executable, str(ROOT / "benchmarks" / "gpu_check_report.py"), str(out), "--results", str(results))
    assert proc.returncode == 0, proc.stderr
    text = results.read_text()
    assert text.startswith("# Recorded results\n\nearlier\n\n## GPU check, ")
    assert "| kernel_tests | ok | 12 |" in text and "| train_125m | timed out after 120s | 120 |" in text
    assert "| rms_norm[96] | float32 | y " in text and "linear_cross_entropy[257]" in text
    assert "| 1 | 5 |" in text and "noise" not in text
    assert "passed" in text  # pytest's summary line
