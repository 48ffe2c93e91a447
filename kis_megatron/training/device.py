"""Where a run computes and in which precision: the device from ``train.device``, the autocast
context from ``train.dtype``, and the GPUs whose memory and peak FLOP/s the planner and the
MFU figure use (one table for both)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from kis_megatron.config import ConfigError


@dataclass(frozen=True)
class GPU:
    """A GPU from its vendor's data sheet: dense tensor-core TFLOP/s, no sparsity."""

    name: str
    memory_gib: int
    bf16_tflops: float
    tf32_tflops: float
    match: str  # what ``torch.cuda.get_device_name`` contains on this GPU

    def peak_tflops(self, bf16: bool) -> float:
        return self.bf16_tflops if bf16 else self.tf32_tflops


# The keys are the names ``--plan-gpu`` takes. For the MFU of a run the first entry whose
# ``match`` is in the device's name counts (an A100 40GB has the 80GB part's peaks).
GPUS = {
    "h100": GPU("NVIDIA H100 SXM 80GB", 80, 989.0, 494.0, "H100"),
    "h200": GPU("NVIDIA H200 141GB", 141, 989.0, 494.0, "H200"),
    "a100": GPU("NVIDIA A100 SXM 80GB", 80, 312.0, 156.0, "A100"),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40, 312.0, 156.0, "A100"),
    "b200": GPU("NVIDIA B200 180GB", 180, 2250.0, 1100.0, "B200"),
}


def resolve_device(name: str) -> torch.device:
    """``train.device`` (auto, cpu, cuda) as a device; cuda without one is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    return torch.device(name)


def uses_bf16(device: torch.device, dtype: str) -> bool:
    """``train.dtype``: bf16 autocast on CUDA by default, fp32 on CPU unless bf16 is asked for."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda")


def autocast_context(device: torch.device, dtype: str):
    """The autocast context of ``train.dtype`` on ``device`` (a no-op context for fp32)."""
    if uses_bf16(device, dtype):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    """Peak dense TFLOP/s of ``device`` at ``train.dtype``, or None off CUDA or for a GPU
    not in :data:`GPUS`."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for gpu in GPUS.values():
        if gpu.match in name:
            return gpu.peak_tflops(uses_bf16(device, dtype))
    return None
