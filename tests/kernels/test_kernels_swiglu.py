"""swiglu (Triton through the interpreter, and the reference) against float64."""

import pytest
import torch

import kis_kernels

TOL = 1e-5


@pytest.mark.parametrize("shape", [(7, 33), (2, 3, 80), (3, 700)])
def test_swiglu_matches_float64(backend, shape, rel_err, gen):
    # Gates span the saturated tails of the sigmoid (|g| up to ~40) as well as the middle.
    gate = torch.randn(shape, generator=gen) * 8.0
    up = torch.randn(shape, generator=gen)
    g = torch.randn(shape, generator=gen)
    g32, u32 = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    y32 = kis_kernels.swiglu(g32, u32)
    (y32 * g).sum().backward()
    g64, u64 = gate.double().requires_grad_(True), up.double().requires_grad_(True)
    y64 = g64 * torch.sigmoid(g64) * u64  # the definition, independent of F.silu
    (y64 * g.double()).sum().backward()
    assert y32.dtype == torch.float32 and y32.shape == gate.shape
    for got, want in ((y32, y64), (g32.grad, g64.grad), (u32.grad, u64.grad)):
        assert torch.isfinite(got).all()
        assert rel_err(got, want) < TOL


def test_swiglu_gradcheck_reference(gen):
    gate = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(kis_kernels.swiglu_reference, (gate, up))


def test_swiglu_rejects_mismatch(backend):
    with pytest.raises(ValueError, match="same shape and dtype"):
        kis_kernels.swiglu(torch.randn(3, 4), torch.randn(3, 5))
