"""Triton kernels of kis-megatron, each with its PyTorch reference and autograd wrapper.

Public ops (all differentiable):

- ``rms_norm(x, weight, eps=1e-6)``
- ``rope(x, cos, sin)``
- ``swiglu(gate, up)``
- ``linear_cross_entropy(hidden, weight, target, ignore_index=-100, group=None)``

The op modules live in ``kis_kernels/ops/`` (``kis_kernels.ops.rms_norm`` is the module,
``kis_kernels.rms_norm`` always the function). Each call picks Triton or the PyTorch reference (see :mod:`kis_kernels.dispatch`): Triton on
CUDA, the reference on CPU, overridable with ``KIS_KERNELS=torch|triton``. Importing
this package never imports triton; it is optional. This package imports nothing from
the rest of the project.
"""

from kis_kernels.dispatch import KernelBackendError, kernel_mode, use_triton
from kis_kernels.ops.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_naive,
    linear_cross_entropy_reference,
)
from kis_kernels.ops.rms_norm import rms_norm, rms_norm_reference
from kis_kernels.ops.rope import rope, rope_reference
from kis_kernels.ops.swiglu import swiglu, swiglu_reference

__all__ = [
    "KernelBackendError",
    "kernel_mode",
    "use_triton",
    "rms_norm",
    "rms_norm_reference",
    "rope",
    "rope_reference",
    "swiglu",
    "swiglu_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_reference",
    "linear_cross_entropy_naive",
]
