"""Kernel tests run the Triton code through Triton's interpreter on CPU.

TRITON_INTERPRET=1 must be in the environment before triton is first imported (triton
builds its standard library compiled or interpreted at import), so it is set here, at
import. It changes nothing for other test folders: ``kernels`` only uses triton when
KIS_KERNELS=triton or the tensors are on CUDA, and never imports it otherwise. The
backend itself is chosen per test with monkeypatch (``KIS_KERNELS`` is read per call),
so nothing leaks out of these tests.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernels._triton import import_triton, interpreter_active  # noqa: E402


def _triton_skip_reason():
    if import_triton() is None:
        return "triton is not installed"
    if not interpreter_active():
        return (
            "triton was imported in this pytest process before tests/kernels/conftest.py could "
            "set TRITON_INTERPRET=1: run `TRITON_INTERPRET=1 pytest ...` or `pytest tests/kernels`"
        )
    return None


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    """Run the test once through the Triton kernels (interpreted) and once through the
    PyTorch references; both are compared against float64 references."""
    if request.param == "triton":
        reason = _triton_skip_reason()
        if reason:
            pytest.skip(reason)
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
