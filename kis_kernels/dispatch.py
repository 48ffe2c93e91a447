"""Per-call choice between the Triton kernels and the PyTorch references.

``KIS_KERNELS`` is read at every call (so tests can switch it with monkeypatch):

- ``torch``: the PyTorch references everywhere.
- ``triton``: the Triton kernels everywhere. On CPU tensors this runs Triton's
  interpreter, which needs ``TRITON_INTERPRET=1`` in the environment *before triton is
  first imported in the process* (triton builds its standard library compiled or
  interpreted at import). Without it the call raises :class:`KernelBackendError`.
- unset, empty or ``auto``: Triton when every tensor is on CUDA and triton imports,
  otherwise the reference. The CPU default therefore never imports triton.
"""

from __future__ import annotations

import os

import torch

from kis_kernels._triton import import_triton, interpret_requested, interpreter_active

ENV_VAR = "KIS_KERNELS"
MODES = ("auto", "torch", "triton")


class KernelBackendError(RuntimeError):
    """The requested kernel backend cannot run here; the message says what to change."""


def kernel_mode() -> str:
    """The backend mode from ``KIS_KERNELS``: one of ``auto``, ``torch``, ``triton``."""
    raw = os.environ.get(ENV_VAR, "")
    mode = raw.strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={raw!r} is not valid: use one of {', '.join(MODES)} (or unset it)")
    return mode


def use_triton(*tensors: torch.Tensor | None) -> bool:
    """Whether this call, on these tensors, should run the Triton kernels.

    Raises :class:`KernelBackendError` when ``KIS_KERNELS=triton`` cannot be honoured.
    """
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if mode == "auto":
        return on_cuda and import_triton() is not None
    # mode == "triton"
    if not on_cuda and not interpret_requested():
        raise KernelBackendError(
            f"{ENV_VAR}=triton on CPU tensors runs Triton's interpreter: set TRITON_INTERPRET=1 "
            f"in the environment before starting Python (or use {ENV_VAR}=torch, or unset it)"
        )
    if import_triton() is None:
        raise KernelBackendError(
            f"{ENV_VAR}=triton but triton is not installed: pip install triton, "
            f"or use {ENV_VAR}=torch (or unset it)"
        )
    if not on_cuda and not interpreter_active():
        raise KernelBackendError(
            "TRITON_INTERPRET=1 was set after triton had been imported in this process, so "
            "triton's standard library is compiled, not interpreted: set TRITON_INTERPRET=1 "
            "in the environment before starting Python"
        )
    return True
