"""SwiGLU activation: silu(gate) * up, the gated MLP of Llama-style models.

With sig = sigmoid(gate) and silu(gate) = gate * sig:
    d up   = dy * silu(gate)
    d gate = dy * up * sig * (1 + gate * (1 - sig))
The backward recomputes sig from the saved inputs instead of storing activations.

Layers: Triton kernels -> launchers ``swiglu_forward`` / ``swiglu_backward`` ->
:class:`SwiGLUFunction` -> :func:`swiglu`; plus the reference :func:`swiglu_reference`.
"""

from __future__ import annotations  # kernel annotations stay strings: triton loads lazily

import torch
import torch.nn.functional as F

from kis_kernels._triton import cdiv, lazy_jit
from kis_kernels.dispatch import use_triton

tl = None  # triton.language, bound by lazy_jit at the first launch (see kis_kernels/_triton.py)

_BLOCK = 1024


def swiglu_launch_config() -> dict:
    """BLOCK and num_warps of both kernels: 1024 elements per program whatever the shape
    (elementwise; 8 per thread). A pure function (see ``kis_kernels.aot``)."""
    return {"BLOCK": _BLOCK, "num_warps": 4}


@lazy_jit
def _swiglu_forward_kernel(GATE, UP, Y, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@lazy_jit
def _swiglu_backward_kernel(DY, GATE, UP, DGATE, DUP, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(DUP + offs, (dy * silu).to(DUP.dtype.element_ty), mask=mask)
    dgate = dy * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(DGATE + offs, dgate.to(DGATE.dtype.element_ty), mask=mask)


def swiglu_forward(gate, up):
    """Launch the forward kernel on contiguous copies/views of gate and up."""
    gate = gate.contiguous()
    up = up.contiguous()
    y = torch.empty_like(gate)
    n = gate.numel()
    if n > 0:
        _swiglu_forward_kernel[(cdiv(n, _BLOCK),)](gate, up, y, n, **swiglu_launch_config())
    return y


def swiglu_backward(dy, gate, up):
    """Launch the backward kernel. Returns (d gate, d up)."""
    dy = dy.contiguous()
    gate = gate.contiguous()
    up = up.contiguous()
    dgate = torch.empty_like(gate)
    dup = torch.empty_like(up)
    n = gate.numel()
    if n > 0:
        _swiglu_backward_kernel[(cdiv(n, _BLOCK),)](dy, gate, up, dgate, dup, n, **swiglu_launch_config())
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton SwiGLU."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy, gate, up)


def _check(gate, up):
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"swiglu: gate ({tuple(gate.shape)}, {gate.dtype}) and up ({tuple(up.shape)}, "
            f"{up.dtype}) must have the same shape and dtype"
        )


def swiglu_reference(gate, up):
    """Plain PyTorch silu(gate) * up (computes in float32 or wider, returns gate's dtype)."""
    _check(gate, up)
    compute = torch.promote_types(gate.dtype, torch.float32)
    return (F.silu(gate.to(compute)) * up.to(compute)).to(gate.dtype)


def swiglu(gate, up):
    """silu(gate) * up elementwise, for tensors of any (equal) shape.

    Runs Triton or the PyTorch reference as :mod:`kis_kernels.dispatch` decides.
    """
    _check(gate, up)
    if use_triton(gate, up):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)
