"""RMSNorm over the last dimension.

    y = x / sqrt(mean(x^2) + eps) * weight        (fp32 accumulation, y in x.dtype)

Layers (Liger style): Triton kernels -> launchers ``rms_norm_forward`` /
``rms_norm_backward`` -> :class:`RMSNormFunction` -> :func:`rms_norm`; plus the plain
PyTorch reference :func:`rms_norm_reference`.

Backward, with xhat = x * rstd and g = dy * weight (N = row length):
    dx = rstd * (g - xhat * mean(g * xhat))
    dweight = sum over rows of dy * xhat
The weight gradient is reduced in two stages: each program owns a block of rows and
writes its partial sum to its own row of a buffer, then torch sums the buffer (no atomics,
so the result is deterministic).
"""

from __future__ import annotations  # kernel annotations stay strings: triton loads lazily

import torch

from kis_kernels._triton import cdiv, lazy_jit, next_power_of_2
from kis_kernels.dispatch import use_triton

tl = None  # triton.language, bound by lazy_jit at the first launch (see kis_kernels/_triton.py)

_MAX_BLOCK = 65536  # one row per program: the whole row must fit one block


@lazy_jit
def _rms_norm_forward_kernel(
    X, stride_x, W, Y, stride_y, RSTD,
    n_cols, eps,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    xf = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (xf * rstd * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@lazy_jit
def _rms_norm_backward_kernel(
    DY, stride_dy, X, stride_x, W, RSTD, DX, stride_dx, DW_PARTIAL,
    n_rows, n_cols, rows_per_program,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Pointers advance row by row (64-bit offsets from the start, no int32 overflow).
    first = row_start.to(tl.int64)
    dy_ptr = DY + first * stride_dy
    x_ptr = X + first * stride_x
    dx_ptr = DX + first * stride_dx
    rstd_ptr = RSTD + first
    for _ in range(row_start, row_end):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        dy_ptr += stride_dy
        x_ptr += stride_x
        dx_ptr += stride_dx
        rstd_ptr += 1
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw, mask=mask)


def _rows(t: torch.Tensor, n_cols: int) -> torch.Tensor:
    """(..., N) -> (M, N) with unit column stride (a view when possible)."""
    t2 = t.reshape(-1, n_cols)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm_launch_config(n_cols: int) -> dict:
    """BLOCK and num_warps of both kernels for rows of ``n_cols`` elements: the whole row
    in one block; more warps for longer rows (2-16 elements per thread up to 8192).
    A pure function, so the ahead-of-time compile check (``kis_kernels.aot``) builds exactly
    what the launchers launch."""
    block = next_power_of_2(n_cols)
    if block > _MAX_BLOCK:
        raise ValueError(f"rms_norm: rows of {n_cols} elements exceed the kernel's limit of {_MAX_BLOCK}")
    return {"BLOCK": block, "num_warps": 4 if block <= 2048 else 8 if block <= 8192 else 16}


def _num_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward: about two per SM on CUDA, a few under the interpreter."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 8
    return max(1, min(n_rows, target))


def rms_norm_forward(x, weight, eps):
    """Launch the forward kernel. Returns (y, rstd): rstd is the per-row fp32 1/rms saved
    for the backward."""
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    n_rows = x2.shape[0]
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        _rms_norm_forward_kernel[(n_rows,)](
            x2, x2.stride(0), weight, y, y.stride(0), rstd, n_cols, eps,
            **rms_norm_launch_config(n_cols),
        )
    return y.view(x.shape), rstd


def rms_norm_backward(dy, x, weight, rstd):
    """Launch the backward kernel. Returns (dx, dweight)."""
    n_cols = x.shape[-1]
    x2 = _rows(x, n_cols)
    dy2 = _rows(dy, n_cols)
    n_rows = x2.shape[0]
    dx = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    n_prog = _num_programs(n_rows, x.device)
    dw_partial = torch.zeros((n_prog, n_cols), dtype=torch.float32, device=x.device)
    if n_rows > 0:
        _rms_norm_backward_kernel[(n_prog,)](
            dy2, dy2.stride(0), x2, x2.stride(0), weight, rstd, dx, dx.stride(0), dw_partial,
            n_rows, n_cols, cdiv(n_rows, n_prog),
            **rms_norm_launch_config(n_cols),
        )
    dweight = dw_partial.sum(0).to(weight.dtype)
    return dx.view(x.shape), dweight


class RMSNormFunction(torch.autograd.Function):
    """Autograd wrapper of the Triton RMSNorm."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dweight = rms_norm_backward(dy, x, weight, rstd)
        return dx, dweight, None


def _check(x, weight):
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
            f"to match the last dimension of x {tuple(x.shape)}"
        )


def rms_norm_reference(x, weight, eps=1e-6):
    """Plain PyTorch RMSNorm with the same contract as :func:`rms_norm`.

    Computes in float32 (float64 stays float64) and returns x's dtype.
    """
    _check(x, weight)
    compute = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(compute)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(compute)
    return y.to(x.dtype)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dimension of ``x`` (any leading shape), scaled by ``weight``;
    the result has x's dtype. Runs Triton or the PyTorch reference as
    :mod:`kis_kernels.dispatch` decides."""
    _check(x, weight)
    if use_triton(x, weight):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)
