"""Backend choice: KIS_KERNELS read per call, clear errors, triton optional and never
imported on the CPU default path. (Compiling for real GPU targets: test_kernels_compile.py.)"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kis_kernels
from kis_kernels.dispatch import KernelBackendError, use_triton

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_python(code, env_updates, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("KIS_KERNELS", "TRITON_INTERPRET")}
    env.update(env_updates)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
        capture_output=True, text=True, timeout=timeout,
    )


def test_mode_is_read_per_call(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv("KIS_KERNELS", raising=False)
    assert kis_kernels.kernel_mode() == "auto" and not use_triton(x)  # CPU default: reference
    monkeypatch.setenv("KIS_KERNELS", "torch")
    assert not use_triton(x)
    monkeypatch.setenv("KIS_KERNELS", "Auto ")
    assert kis_kernels.kernel_mode() == "auto"


def test_bad_mode_names_the_variable(monkeypatch):
    monkeypatch.setenv("KIS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="KIS_KERNELS='cuda' is not valid"):
        kis_kernels.rms_norm(torch.randn(2, 4), torch.ones(4))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KIS_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(KernelBackendError, match="TRITON_INTERPRET=1"):
        kis_kernels.swiglu(torch.randn(3), torch.randn(3))


def test_torch_mode_never_launches_triton(monkeypatch):
    """KIS_KERNELS=torch gives exactly the reference even where Triton would run."""
    monkeypatch.setenv("KIS_KERNELS", "torch")

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path was taken")

    from kis_kernels.ops.rms_norm import RMSNormFunction

    monkeypatch.setattr(RMSNormFunction, "apply", boom)
    x, w = torch.randn(3, 8), torch.randn(8)
    assert torch.equal(kis_kernels.rms_norm(x, w), kis_kernels.rms_norm_reference(x, w))


def test_cpu_default_never_imports_triton_and_works_without_it():
    """In a fresh process where importing triton fails (as if not installed), the package
    imports, every op runs forward and backward on CPU, and no import of triton is even
    attempted; KIS_KERNELS=triton then fails with a message saying what to install."""
    code = """
        import sys
        attempts = []

        class NoTriton:
            def find_spec(self, name, path=None, target=None):
                if name == "triton" or name.startswith("triton."):
                    attempts.append(name)
                    raise ImportError("triton blocked by the test")
                return None

        sys.meta_path.insert(0, NoTriton())
        import os, torch, kis_kernels
        h = torch.randn(6, 8, requires_grad=True)
        w = torch.randn(8, requires_grad=True)
        y = kis_kernels.rms_norm(h, w)
        y = kis_kernels.swiglu(y, y)
        q = kis_kernels.rope(y.view(1, 6, 2, 4), torch.randn(6, 2), torch.randn(6, 2))
        loss = kis_kernels.linear_cross_entropy(q.reshape(6, 8), torch.randn(11, 8), torch.arange(6))
        loss.backward()
        assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0
        assert attempts == [], attempts
        os.environ["KIS_KERNELS"] = "triton"
        try:
            kis_kernels.swiglu(torch.randn(3), torch.randn(3))
        except kis_kernels.KernelBackendError as e:
            print("ERROR:", e)
        """
    res = _run_python(code, {"TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert "ERROR: KIS_KERNELS=triton but triton is not installed" in res.stdout
