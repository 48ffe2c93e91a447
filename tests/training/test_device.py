"""The GPU table behind MFU and the planner: the most specific name wins, and an fp32 run is
divided by the fp32 peak unless TF32 matmuls are on (torch's default is off)."""

from __future__ import annotations

import pytest
import torch

from kis_megatron.training import device as dev

# Names as torch.cuda.get_device_name reports them on these parts.
NAMES = {
    "NVIDIA H100 80GB HBM3": "h100",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H100 NVL": "h100-nvl",
    "NVIDIA H200": "h200",
    "NVIDIA H200 NVL": "h200-nvl",
    "NVIDIA A100-SXM4-80GB": "a100",
    "NVIDIA A100 80GB PCIe": "a100",
    "NVIDIA A100-SXM4-40GB": "a100-40gb",
    "NVIDIA A100-PCIE-40GB": "a100-40gb",
    "NVIDIA B200": "b200",
}


@pytest.mark.parametrize("name,key", list(NAMES.items()))
def test_most_specific_entry_names_the_part(name, key):
    assert dev.gpu_of(name) is dev.GPUS[key]


def test_unknown_gpu_has_no_peak():
    assert dev.gpu_of("NVIDIA GeForce RTX 4090") is None


@pytest.fixture
def fake_cuda(monkeypatch):
    def use(name):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return use


@pytest.fixture
def tf32_off():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.get_float32_matmul_precision()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved[0]
    torch.set_float32_matmul_precision(saved[1])


def test_fp32_run_uses_the_fp32_peak_unless_tf32_is_on(fake_cuda, tf32_off):
    cuda = torch.device("cuda")
    fake_cuda("NVIDIA H100 80GB HBM3")
    assert dev.peak_tflops(cuda, "fp32") == 67.0
    assert dev.peak_tflops(cuda, "auto") == 989.0  # bf16 autocast on CUDA
    torch.set_float32_matmul_precision("high")
    assert dev.peak_tflops(cuda, "fp32") == 494.0
    fake_cuda("NVIDIA H100 PCIe")
    assert dev.peak_tflops(cuda, "bf16") == 756.0


def test_no_peak_off_cuda():
    assert dev.peak_tflops(torch.device("cpu"), "fp32") is None
