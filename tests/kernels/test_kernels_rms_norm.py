"""rms_norm (Triton through the interpreter, and the reference) against float64."""

import pytest
import torch

import kis_kernels

TOL = 1e-5  # fp32 relative error bound; observed ~1e-7


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


@pytest.mark.parametrize("shape", [(37, 96), (5, 3, 33), (16, 80)])
def test_rms_norm_matches_float64(backend, shape, rel_err, gen):
    n = shape[-1]
    x = torch.randn(shape, generator=gen) * 3.0 + 0.5
    w = torch.rand(n, generator=gen) + 0.5
    gy = torch.randn(shape, generator=gen)
    x32, w32 = _leaf(x), _leaf(w)
    y32 = kis_kernels.rms_norm(x32, w32, 1e-5)
    x64, w64 = _leaf(x.double()), _leaf(w.double())
    y64 = kis_kernels.rms_norm_reference(x64, w64, 1e-5)
    (y32 * gy).sum().backward()
    (y64 * gy.double()).sum().backward()
    assert y32.dtype == torch.float32 and y32.shape == x.shape
    assert rel_err(y32, y64) < TOL
    assert rel_err(x32.grad, x64.grad) < TOL
    assert rel_err(w32.grad, w64.grad) < TOL


def test_rms_norm_reference_is_the_formula(rel_err, gen):
    """The float64 reference itself against the definition, row by row."""
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    w = torch.randn(7, generator=gen, dtype=torch.float64)
    want = torch.stack([row / (row.pow(2).sum() / 7 + 1e-6).sqrt() * w for row in x])
    assert rel_err(kis_kernels.rms_norm_reference(x, w), want) < 1e-14


def test_rms_norm_gradcheck_reference(gen):
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: kis_kernels.rms_norm_reference(x, w, 1e-6), (x, w))


def test_rms_norm_bf16_reference_keeps_dtype(monkeypatch, rel_err, gen):
    monkeypatch.setenv("KIS_KERNELS", "torch")
    x = torch.randn(6, 80, generator=gen)
    w = torch.rand(80, generator=gen) + 0.5
    y = kis_kernels.rms_norm(x.bfloat16(), w.bfloat16())
    assert y.dtype == torch.bfloat16
    assert rel_err(y, kis_kernels.rms_norm_reference(x.double(), w.double())) < 2e-2


def test_rms_norm_rejects_mismatched_weight(backend):
    with pytest.raises(ValueError, match="weight has shape"):
        kis_kernels.rms_norm(torch.randn(4, 8), torch.randn(7))
