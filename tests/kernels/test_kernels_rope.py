"""rope (Triton through the interpreter, and the reference) against float64 and against
an independent complex-number formulation."""

import pytest
import torch

import kis_kernels

TOL = 1e-5


def _angles(seq, half, gen, offset=0):
    """Llama-style angles pos * base^(-2i/d), from position ``offset``, in float64."""
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float64) / half)
    pos = torch.arange(offset, offset + seq, dtype=torch.float64)
    return pos[:, None] * inv_freq[None, :] + 0.01 * torch.rand(seq, half, generator=gen, dtype=torch.float64)


def _complex_rope(x, theta):
    """Pairs (x[i], x[i + h]) as complex numbers times exp(i theta): float64 oracle."""
    h = x.shape[-1] // 2
    z = torch.complex(x[..., :h], x[..., h:]) * torch.polar(torch.ones_like(theta), theta)[None, :, None, :]
    return torch.cat((z.real, z.imag), dim=-1)


def test_rope_reference_is_a_complex_rotation(rel_err, gen):
    x = torch.randn(2, 6, 3, 16, generator=gen, dtype=torch.float64)
    theta = _angles(6, 8, gen, offset=5)
    got = kis_kernels.rope_reference(x, theta.cos(), theta.sin())
    assert rel_err(got, _complex_rope(x, theta)) < 1e-14


@pytest.mark.parametrize("shape", [(2, 5, 4, 64), (1, 3, 3, 80)])
def test_rope_matches_float64(backend, shape, rel_err, gen):
    b, s, h, d = shape
    x = torch.randn(shape, generator=gen)
    theta = _angles(s, d // 2, gen, offset=7)
    g = torch.randn(shape, generator=gen)
    x32 = x.clone().requires_grad_(True)
    y32 = kis_kernels.rope(x32, theta.cos().float(), theta.sin().float())
    (y32 * g).sum().backward()
    x64 = x.double().requires_grad_(True)
    y64 = _complex_rope(x64, theta)
    (y64 * g.double()).sum().backward()
    assert y32.dtype == torch.float32 and y32.shape == x.shape
    assert rel_err(y32, y64) < TOL
    assert rel_err(x32.grad, x64.grad) < TOL
    # The backward is the rotation by -theta.
    assert rel_err(x64.grad, _complex_rope(g.double(), -theta)) < 1e-12


def test_rope_gqa_and_strided_views(backend, rel_err, gen):
    """q with 4 heads and k with 2 heads share cos/sin; both are strided views of one
    fused projection (batch, seq, 4 + 2 + 2, head_dim), as attention produces them."""
    b, s, d = 2, 5, 64
    qkv = torch.randn(b, s, 8, d, generator=gen)
    theta = _angles(s, d // 2, gen)
    cos, sin = theta.cos().float(), theta.sin().float()
    leaf = qkv.clone().requires_grad_(True)
    q, k = leaf[:, :, :4], leaf[:, :, 4:6]
    assert not q.is_contiguous()
    gq = torch.randn(b, s, 4, d, generator=gen)
    gk = torch.randn(b, s, 2, d, generator=gen)
    yq, yk = kis_kernels.rope(q, cos, sin), kis_kernels.rope(k, cos, sin)
    ((yq * gq).sum() + (yk * gk).sum()).backward()
    assert rel_err(yq, _complex_rope(qkv[:, :, :4].double(), theta)) < TOL
    assert rel_err(yk, _complex_rope(qkv[:, :, 4:6].double(), theta)) < TOL
    assert rel_err(leaf.grad[:, :, :4], _complex_rope(gq.double(), -theta)) < TOL
    assert rel_err(leaf.grad[:, :, 4:6], _complex_rope(gk.double(), -theta)) < TOL
    assert leaf.grad[:, :, 6:].abs().max().item() == 0.0


def test_rope_gradcheck_reference(gen):
    x = torch.randn(1, 3, 2, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    theta = _angles(3, 3, gen)
    assert torch.autograd.gradcheck(lambda x: kis_kernels.rope_reference(x, theta.cos(), theta.sin()), (x,))


def test_rope_rejects_bad_shapes(backend):
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="cos has shape"):
        kis_kernels.rope(x, torch.randn(4, 8), torch.randn(4, 4))
    with pytest.raises(ValueError, match="head_dim must be even"):
        kis_kernels.rope(torch.randn(1, 4, 2, 7), torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        kis_kernels.rope(torch.randn(4, 2, 8), torch.randn(4, 4), torch.randn(4, 4))
