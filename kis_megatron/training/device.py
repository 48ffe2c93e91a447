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
    """A GPU from its vendor's data sheet: dense TFLOP/s (no sparsity) of bf16 and tf32 on the
    tensor cores and of plain fp32 (no tensor cores: what an fp32 matmul gets unless TF32 is
    enabled)."""

    name: str
    memory_gib: int
    bf16_tflops: float
    tf32_tflops: float
    fp32_tflops: float
    match: tuple[str, ...]  # every one of these is in ``torch.cuda.get_device_name`` (any case)

    def peak_tflops(self, bf16: bool, tf32: bool = False) -> float:
        if bf16:
            return self.bf16_tflops
        return self.tf32_tflops if tf32 else self.fp32_tflops

    def matches(self, device_name: str) -> bool:
        return all(part.lower() in device_name.lower() for part in self.match)


# The keys are the names ``--plan-gpu`` takes. For the MFU of a run the entry with the most
# name parts in the device's name counts, so "NVIDIA H100 PCIe" is the PCIe part, not the SXM
# one ("H100"), and an A100 without "40GB" in its name is the 80 GB part (the same peaks).
GPUS = {
    "h100": GPU("NVIDIA H100 SXM 80GB", 80, 989.0, 494.0, 67.0, ("H100",)),
    "h100-pcie": GPU("NVIDIA H100 PCIe 80GB", 80, 756.0, 378.0, 51.0, ("H100", "PCIe")),
    "h100-nvl": GPU("NVIDIA H100 NVL 94GB", 94, 835.0, 418.0, 60.0, ("H100", "NVL")),
    "h200": GPU("NVIDIA H200 SXM 141GB", 141, 989.0, 494.0, 67.0, ("H200",)),
    "h200-nvl": GPU("NVIDIA H200 NVL 141GB", 141, 835.0, 418.0, 60.0, ("H200", "NVL")),
    "a100": GPU("NVIDIA A100 80GB", 80, 312.0, 156.0, 19.5, ("A100",)),
    "a100-40gb": GPU("NVIDIA A100 40GB", 40, 312.0, 156.0, 19.5, ("A100", "40GB")),
    "b200": GPU("NVIDIA B200 180GB (HGX, 1000 W)", 180, 2250.0, 1100.0, 80.0, ("B200",)),
}


def gpu_of(device_name: str) -> Optional[GPU]:
    """The entry of :data:`GPUS` that names this device most specifically, or None."""
    found = [g for g in GPUS.values() if g.matches(device_name)]
    return max(found, key=lambda g: len(g.match)) if found else None


def tf32_matmuls() -> bool:
    """Whether float32 matmuls run on the tensor cores in TF32 (torch's default: no)."""
    return torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"


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
    """Peak dense TFLOP/s of ``device`` at ``train.dtype`` (fp32 runs: the TF32 peak only when
    TF32 matmuls are on), or None off CUDA or for a GPU not in :data:`GPUS`."""
    if device.type != "cuda":
        return None
    gpu = gpu_of(torch.cuda.get_device_name(device))
    return gpu.peak_tflops(uses_bf16(device, dtype), tf32_matmuls()) if gpu else None
