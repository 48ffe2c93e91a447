"""Rotary position embedding, "rotate half" convention (Llama / Hugging Face, non-interleaved).

For x of shape (batch, seq, heads, head_dim) with h = head_dim // 2, x1 = x[..., :h],
x2 = x[..., h:] and per-position angles theta (cos, sin of shape (seq, h)):

    out[..., :h] = x1 * cos - x2 * sin
    out[..., h:] = x2 * cos + x1 * sin

The map is a rotation of each (x1[i], x2[i]) pair by theta[i], so its backward is the
rotation by -theta: the same kernel with sin negated. cos/sin are treated as constants
(no gradient); the caller offsets them for any position offset. Any head count works,
so q and k of grouped-query attention go through separately with the same cos/sin.

Layers: Triton kernel -> launchers ``rope_forward`` / ``rope_backward`` ->
:class:`RoPEFunction` -> :func:`rope`; plus the reference :func:`rope_reference`.
"""

from __future__ import annotations  # kernel annotations stay strings: triton loads lazily

import torch

from kis_kernels._triton import lazy_jit, next_power_of_2
from kis_kernels.dispatch import use_triton

tl = None  # triton.language, bound by lazy_jit at the first launch (see kis_kernels/_triton.py)


@lazy_jit
def _rope_kernel(
    X, stride_xb, stride_xs, stride_xh, Y, stride_yb, stride_ys, stride_yh,
    COS, SIN, stride_cs,
    seq_len, n_heads, half,
    SIGN: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (batch, position): all heads of that token share one cos/sin row.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < half
    mask = (heads < n_heads) & dmask
    cos = tl.load(COS + s * stride_cs + dims, mask=dmask, other=0.0).to(tl.float32)
    sin = tl.load(SIN + s * stride_cs + dims, mask=dmask, other=0.0).to(tl.float32) * SIGN
    x_ptr = X + b * stride_xb + s * stride_xs + heads * stride_xh + dims
    y_ptr = Y + b * stride_yb + s * stride_ys + heads * stride_yh + dims
    x1 = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr, (x1 * cos - x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(y_ptr + half, (x2 * cos + x1 * sin).to(Y.dtype.element_ty), mask=mask)


def rope_launch_config(n_heads: int, head_dim: int) -> dict:
    """BLOCK_H, BLOCK_D and num_warps for one (batch, position) program over all heads: the
    whole (heads x head_dim / 2) tile in one block. A pure function (see ``kis_kernels.aot``)."""
    block_h, block_d = next_power_of_2(n_heads), next_power_of_2(head_dim // 2)
    return {"BLOCK_H": block_h, "BLOCK_D": block_d, "num_warps": 4 if block_h * block_d <= 4096 else 8}


def _rotate(x, cos, sin, sign: float):
    """Launch the kernel: rotate x by sign * theta. Returns a new contiguous tensor."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    batch, seq, heads, head_dim = x.shape
    half = head_dim // 2
    cos = cos.contiguous()
    sin = sin.contiguous()
    y = torch.empty((batch, seq, heads, head_dim), dtype=x.dtype, device=x.device)
    if y.numel() > 0:
        _rope_kernel[(batch * seq,)](
            x, x.stride(0), x.stride(1), x.stride(2), y, y.stride(0), y.stride(1), y.stride(2),
            cos, sin, cos.stride(0),
            seq, heads, half,
            SIGN=sign, **rope_launch_config(heads, head_dim),
        )
    return y


def rope_forward(x, cos, sin):
    """Launch the forward rotation (by +theta)."""
    return _rotate(x, cos, sin, 1.0)


def rope_backward(dy, cos, sin):
    """Launch the backward: the rotation by -theta of the output gradient."""
    return _rotate(dy, cos, sin, -1.0)


class RoPEFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RoPE; cos and sin get no gradient."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rope_forward(x, cos, sin)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return rope_backward(dy, cos, sin), None, None


def _check(x, cos, sin):
    if x.dim() != 4:
        raise ValueError(f"rope: x must have shape (batch, seq, heads, head_dim), got {tuple(x.shape)}")
    seq, head_dim = x.shape[1], x.shape[3]
    if head_dim % 2:
        raise ValueError(f"rope: head_dim must be even, got {head_dim}")
    want = (seq, head_dim // 2)
    for name, t in (("cos", cos), ("sin", sin)):
        if tuple(t.shape) != want:
            raise ValueError(
                f"rope: {name} has shape {tuple(t.shape)}, expected (seq, head_dim // 2) = {want} "
                f"for x of shape {tuple(x.shape)}"
            )


def rope_reference(x, cos, sin):
    """Plain PyTorch RoPE with the same contract as :func:`rope` (computes in float32
    or wider, returns x's dtype). Differentiable in x (and in cos/sin, unlike the kernel)."""
    _check(x, cos, sin)
    half = x.shape[-1] // 2
    compute = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), torch.float32)
    c = cos.to(compute)[None, :, None, :]  # (1, seq, 1, half)
    s = sin.to(compute)[None, :, None, :]
    x1 = x[..., :half].to(compute)
    x2 = x[..., half:].to(compute)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope(x, cos, sin):
    """Rotate ``x`` (batch, seq, heads, head_dim) by the angles whose cos/sin are given
    per position, shape (seq, head_dim // 2): rotate-half convention, see module doc.

    Runs Triton or the PyTorch reference as :mod:`kis_kernels.dispatch` decides.
    """
    _check(x, cos, sin)
    if use_triton(x, cos, sin):
        return RoPEFunction.apply(x, cos, sin)
    return rope_reference(x, cos, sin)
