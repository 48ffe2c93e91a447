"""What can be checked on CPU of the one GPU check (benchmarks/gpu_check.sh), which has not
run on a GPU: the shell script parses and its dry run names every part and existing files;
the Python parts parse their arguments; the NCCL layout script runs for real with gloo; the
report is built from a real CPU run of the GPU kernel tests' harness and the preflight. The
whole check at CPU sizes, under the GPU machine's versions: benchmarks/gpu_rehearsal.sh."""

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
    """The parts, their caps (at most 540 s in all, so one 600 s call holds them), python3
    rather than a bare python, and a dry run that writes nothing."""
    for script in ("gpu_check.sh", "gpu_rehearsal.sh", "bench_gpu_train.sh", "gpu_prep.sh"):
        assert run("bash", "-n", str(ROOT / "benchmarks" / script)).returncode == 0, script
    one = run("bash", str(SCRIPT), "--dry-run", env={"NGPU": "1", "OUT": str(tmp_path / "never")})
    assert one.returncode == 0, one.stderr
    names = re.findall(r"^(\w+)\s+\(cap\s+(\d+)s\)", one.stdout, re.M)
    assert [n for n, _ in names] == ["preflight", "kernel_tests", "data", "kernel_bench", "train_125m"]
    assert sum(int(c) for _, c in names) <= 540
    assert all(line.split()[3] == "python3" or "python3" in line for line in one.stdout.splitlines()
               if "(cap" in line and ".py" in line)
    two = run("bash", str(SCRIPT), "--dry-run", env={"NGPU": "2"})
    caps = re.findall(r"\(cap\s+(\d+)s\)", two.stdout)
    assert "layouts_nccl" in two.stdout and "NPROCS=2" in two.stdout and sum(map(int, caps)) <= 540
    for path in re.findall(r"(?:tests|benchmarks|examples)/[\w/]+\.(?:py|sh)", two.stdout):
        assert (ROOT / path).is_file(), path
    assert not (tmp_path / "never").exists()  # a dry run writes nothing
    assert run("bash", str(SCRIPT), "--bogus").returncode == 2


def test_bench_scripts_call_no_bare_python_or_torchrun():
    """The GPU machine has python3 and no torchrun on the PATH, and nothing installed."""
    for script in ("gpu_check.sh", "bench_gpu_train.sh"):
        text = (ROOT / "benchmarks" / script).read_text()
        code = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
        assert not [ln for ln in code if re.search(r"(^|\s)(python|torchrun)\s", ln)], script
        assert "PYTHONPATH" in text


def test_python_parts_parse_their_arguments():
    for script in ("bench_kernels.py", "gpu_layouts.py", "gpu_check_report.py", "bench_kernel_resources.py",
                   "gpu_preflight.py"):
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
def test_report_from_a_real_cpu_run_of_the_kernel_harness(tmp_path):
    out = tmp_path / "gpu_check"
    out.mkdir()
    errors = out / "kernel_errors.jsonl"
    # The GPU kernel tests' own harness, its CPU (interpreter) variant, records real errors.
    tests = run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                "tests/kernels/test_kernels_gpu.py", env={"KIS_GPU_ERRORS": str(errors)})
    assert tests.returncode == 0, tests.stdout[-2000:]
    pre = run(sys.executable, str(ROOT / "benchmarks" / "gpu_preflight.py"), "--device", "cpu",
              "--out", str(out / "preflight.md"), env={"TRITON_INTERPRET": "1"})
    assert pre.returncode == 0 and "vector add on cpu correct" in (out / "preflight.md").read_text()
    (out / "parts.tsv").write_text("kernel_tests\tok\t12\tpytest ...\t4 passed\n"
                                   "train_125m\ttimed out after 110s\t110\tbash x\tstep 3\n")
    (out / "train.md").write_text("NVIDIA H200, torch 2.13, preset 125m\n| processes | tokens/s |\n| 1 | 5 |\n")
    proc = run(sys.executable, str(ROOT / "benchmarks" / "gpu_check_report.py"), str(out))
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert text.startswith("## GPU check, ") and "### Preflight" in text and "- torch " in text
    assert "| kernel_tests | ok | 12 | `pytest ...` | 4 passed |" in text
    assert "| train_125m | timed out after 110s | 110 |" in text
    assert "| rms_norm[96] | float32 | y " in text and "linear_cross_entropy[257]" in text
    assert "| 1 | 5 |" in text and "(no result yet" in text  # no kernel bench yet: said so
    assert sorted(p.name for p in out.iterdir()) == ["kernel_errors.jsonl", "parts.tsv", "preflight.md",
                                                      "report.md", "train.md"]
    results = tmp_path / "RESULTS.md"
    results.write_text("# Recorded results\n\nearlier\n")
    proc = run(sys.executable, str(ROOT / "benchmarks" / "gpu_check_report.py"), str(out), "--results", str(results))
    assert proc.returncode == 0 and results.read_text().startswith("# Recorded results\n\nearlier\n\n## GPU check, ")
