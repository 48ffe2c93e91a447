"""The model's fused operations, in one place.

Each op takes ``fused``: True routes to the ``kis_kernels`` package (Triton on CUDA; its PyTorch
reference on CPU, or Triton through the interpreter when ``KIS_KERNELS=triton`` and
``TRITON_INTERPRET=1``); False uses plain PyTorch (``model.kernels=false``), the baseline the
kernels are measured against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kis_kernels


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, fused: bool = True) -> torch.Tensor:
    if fused:
        return kis_kernels.rms_norm(x, weight, eps)
    return kis_kernels.rms_norm_reference(x, weight, eps)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """x: (B, T, heads, head_dim); cos, sin: (T, head_dim // 2), already offset to x's positions."""
    if fused:
        return kis_kernels.rope(x, cos, sin)
    return kis_kernels.rope_reference(x, cos, sin)


def swiglu(gate: torch.Tensor, up: torch.Tensor, fused: bool = True) -> torch.Tensor:
    if fused:
        return kis_kernels.swiglu(gate, up)
    return kis_kernels.swiglu_reference(gate, up)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                         ignore_index: int = -100, fused: bool = True, group=None) -> torch.Tensor:
    """Mean next-token loss of ``hidden @ weight.T`` against ``target`` (ignore_index skipped).

    ``group``: vocabulary-parallel group, ``weight`` being this rank's shard of the vocabulary
    rows (see ``kis_kernels.linear_cross_entropy``: the gradient reaching ``hidden`` is this
    rank's partial, to be all-reduced by the caller). Under autocast the LM head runs in the
    autocast dtype like every other linear layer (the fused op keeps the softmax in float32)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    if fused:
        return kis_kernels.linear_cross_entropy(hidden, weight, target, ignore_index=ignore_index, group=group)
    if group is not None:  # the plain path over shards: the chunked PyTorch reference
        return kis_kernels.linear_cross_entropy_reference(hidden, weight, target, ignore_index, group)
    logits = (hidden @ weight.t()).float()
    return F.cross_entropy(logits, target, ignore_index=ignore_index)
