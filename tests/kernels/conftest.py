"""Kernel tests run the Triton code through Triton's interpreter on CPU.

TRITON_INTERPRET=1 must be in the environment before triton is first imported (triton
builds its standard library compiled or interpreted at import), so it is set here, at
import. It changes nothing for other test folders: ``kis_kernels`` only uses triton when
KIS_KERNELS=triton or the tensors are on CUDA, and never imports it otherwise. The
backend itself is chosen per test with monkeypatch (``KIS_KERNELS`` is read per call),
so nothing leaks out of these tests.

In a whole-suite run another folder may import triton first (megatron-core does, at
import), too early for this file. Then the Triton-backend tests of this folder are run
once, together, in a fresh ``python -m pytest`` process with TRITON_INTERPRET=1, and each
test here reports its outcome from there (``pytest_pyfunc_call`` below), so they are
never silently skipped.
"""

import json
import os
import subprocess
import sys
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kis_kernels._triton import import_triton, interpreter_active  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
_RESULTS_ENV = "KIS_KERNELS_TEST_RESULTS"  # set in the child process: where to log outcomes
_child_results = {}  # nodeid -> (outcome, text), filled once per session when needed


def _is_triton_item(item) -> bool:
    callspec = getattr(item, "callspec", None)
    return (
        callspec is not None
        and callspec.params.get("backend") == "triton"
        and str(item.path).startswith(HERE)
    )


def _needs_child_process() -> bool:
    return import_triton() is not None and not interpreter_active()


def _run_triton_tests_in_child(session) -> dict:
    if _child_results:
        return _child_results
    nodeids = [item.nodeid for item in session.items if _is_triton_item(item)]
    fd, log = tempfile.mkstemp(prefix="kernels_test_results_", suffix=".jsonl")
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if k != "KIS_KERNELS"}
    env.update({"TRITON_INTERPRET": "1", _RESULTS_ENV: log})
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *nodeids],
            cwd=str(session.config.rootpath), env=env, capture_output=True, text=True, timeout=1200,
        )
        if os.path.exists(log):
            with open(log) as f:
                for line in f:
                    rec = json.loads(line)
                    _child_results[rec["nodeid"]] = (rec["outcome"], rec["text"])
    finally:
        if os.path.exists(log):
            os.unlink(log)
    _child_results.setdefault("__output__", ("", proc.stdout[-4000:] + proc.stderr[-4000:]))
    return _child_results


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """Triton-backend test while triton is not interpreted here: report the child's result."""
    if not _is_triton_item(pyfuncitem) or not _needs_child_process():
        return None
    results = _run_triton_tests_in_child(pyfuncitem.session)
    if pyfuncitem.nodeid not in results:
        pytest.fail("not run in the TRITON_INTERPRET=1 child process:\n" + results["__output__"][1],
                    pytrace=False)
    outcome, text = results[pyfuncitem.nodeid]
    if outcome == "failed":
        pytest.fail("in a fresh TRITON_INTERPRET=1 process:\n" + text, pytrace=False)
    if outcome == "skipped":
        pytest.skip(text)
    return True


def pytest_runtest_logreport(report):
    """In the child process: log each test's outcome for the parent (see module doc)."""
    path = os.environ.get(_RESULTS_ENV)
    if not path or (report.when != "call" and report.outcome == "passed"):
        return
    text = report.longreprtext if report.outcome != "skipped" else str(report.longrepr[-1])
    with open(path, "a") as f:
        f.write(json.dumps({"nodeid": report.nodeid, "outcome": report.outcome, "text": text}) + "\n")


@pytest.fixture(params=[pytest.param("triton", marks=pytest.mark.slow), "torch"])
def backend(request, monkeypatch):
    """Run the test once through the Triton kernels (interpreted: marked slow) and once
    through the PyTorch references; both are compared against float64 references."""
    if request.param == "triton" and import_triton() is None:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("KIS_KERNELS", request.param)
    return request.param


@pytest.fixture
def rel_err():
    """max |a - b| / max |b|, computed in float64 (0 when both are all zeros)."""

    def rel(a, b):
        a, b = a.detach().double(), b.detach().double()
        assert a.shape == b.shape, (a.shape, b.shape)
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item() if a.numel() else 0.0
        return diff / scale if scale > 0 else diff

    return rel


@pytest.fixture
def gen():
    """A seeded generator: fresh random (never zero) inputs, reproducible failures."""
    return torch.Generator().manual_seed(1234)
