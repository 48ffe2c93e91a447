"""The kernels compiled by Triton on a GPU, in bf16 and fp32, against float64 references
computed from the same (rounded) inputs, at the model's shapes: hidden 4096 and 3200 (the 7B
and 3B presets), 32 heads of 128 with 8 KV heads, vocabularies 32000 and 128256, an odd
token count. Outputs and every input gradient are compared (max |error| / max |reference|).

Skipped without CUDA. Run with ``TRITON_INTERPRET=0`` (this folder's conftest otherwise
turns the interpreter on), as ``benchmarks/gpu_check.sh`` does; ``KIS_GPU_ERRORS=FILE``
appends the observed errors as JSON lines for the record. On CPU the same checks run in
fp32 at small shapes through Triton's interpreter, which tests this file itself.

The bf16 tolerances follow from bf16's rounding (2^-8 ~ 3.9e-3 relative per element): 1e-2
for elementwise outputs and gradients and for the fused loss's gradients (it rounds each
logits chunk and its gradient to bf16, and sums grad_weight's chunks in fp32). They have not yet met a GPU: the first run records the real errors.
"""

import json
import os

import pytest
import torch

import kis_kernels
from kis_kernels._triton import interpreter_active

pytestmark = [pytest.mark.slow]  # on CPU: the Triton kernels through the interpreter

TOL = {  # (outputs, gradients) by dtype; the loss value itself: LOSS_TOL
    torch.bfloat16: {"elementwise": (1e-2, 1e-2), "linear_cross_entropy": (5e-3, 1e-2)},
    torch.float32: {"elementwise": (1e-5, 1e-5), "linear_cross_entropy": (1e-5, 1e-4)},
}
SHAPES = {
    "cuda": {"tokens": 4099, "hidden": (4096, 3200), "rope": (2, 1031, 32, 8, 128),
             "ffn": 11008, "vocab": (32000, 128256)},
    "cpu": {"tokens": 37, "hidden": (96,), "rope": (1, 9, 4, 2, 64), "ffn": 80, "vocab": (257,)},
}


@pytest.fixture(params=[("cuda", torch.bfloat16), ("cuda", torch.float32), ("cpu", torch.float32)],
                ids=["cuda-bf16", "cuda-fp32", "cpu-fp32-interpreter"])
def target(request, monkeypatch):
    device, dtype = request.param
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        if interpreter_active():
            pytest.skip("Triton's interpreter is on: run with TRITON_INTERPRET=0 to test the compiled kernels")
    elif not interpreter_active():
        pytest.skip("triton was imported without its interpreter in this process")
    monkeypatch.setenv("KIS_KERNELS", "triton")
    return device, dtype


def rel(a, b) -> float:
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def check(op: str, what: dict, dtype, kind: str = "elementwise"):
    """Assert each (ours, reference) pair in ``what`` within tolerance; record the errors."""
    out_tol, grad_tol = TOL[dtype][kind]
    errors = {name: rel(ours, ref) for name, (ours, ref) in what.items()}
    path = os.environ.get("KIS_GPU_ERRORS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"op": op, "dtype": str(dtype).removeprefix("torch."), **errors}) + "\n")
    for name, err in errors.items():
        tol = grad_tol if name.startswith("d") else out_tol
        assert err <= tol, (op, name, err, tol)


def leaves(*tensors, dtype):
    """(low-precision leaves, float64 leaves of the same rounded values)."""
    low = [t.to(dtype).requires_grad_(True) for t in tensors]
    return low, [t.detach().double().requires_grad_(True) for t in low]


def test_rms_norm(target):
    device, dtype = target
    g = torch.Generator(device).manual_seed(0)
    shape = SHAPES[device]
    for hidden in shape["hidden"]:
        x = torch.randn(shape["tokens"], hidden, device=device, generator=g) * 2 + 0.5
        w = torch.rand(hidden, device=device, generator=g) + 0.5
        dy = torch.randn(shape["tokens"], hidden, device=device, generator=g).to(dtype)
        (x, w), (x64, w64) = leaves(x, w, dtype=dtype)
        y, y64 = kis_kernels.rms_norm(x, w, 1e-5), kis_kernels.rms_norm_reference(x64, w64, 1e-5)
        (y * dy).float().sum().backward()
        (y64 * dy.double()).sum().backward()
        check(f"rms_norm[{hidden}]", {"y": (y, y64), "dx": (x.grad, x64.grad), "dweight": (w.grad, w64.grad)},
              dtype)


def test_rope(target):
    device, dtype = target
    g = torch.Generator(device).manual_seed(1)
    batch, seq, heads, kv_heads, head_dim = SHAPES[device]["rope"]
    angles = torch.rand(seq, head_dim // 2, device=device, generator=g) * 6.3
    cos, sin = angles.cos(), angles.sin()
    for n in (heads, kv_heads):  # q and k of grouped-query attention
        x = torch.randn(batch, seq, n, head_dim, device=device, generator=g)
        dy = torch.randn(batch, seq, n, head_dim, device=device, generator=g).to(dtype)
        (x,), (x64,) = leaves(x, dtype=dtype)
        y, y64 = kis_kernels.rope(x, cos, sin), kis_kernels.rope_reference(x64, cos.double(), sin.double())
        (y * dy).float().sum().backward()
        (y64 * dy.double()).sum().backward()
        check(f"rope[{n} heads]", {"y": (y, y64), "dx": (x.grad, x64.grad)}, dtype)


def test_swiglu(target):
    device, dtype = target
    g = torch.Generator(device).manual_seed(2)
    shape = (SHAPES[device]["tokens"], SHAPES[device]["ffn"])
    gate, up = (torch.randn(shape, device=device, generator=g) * 3 for _ in range(2))
    dy = torch.randn(shape, device=device, generator=g).to(dtype)
    (gate, up), (gate64, up64) = leaves(gate, up, dtype=dtype)
    y, y64 = kis_kernels.swiglu(gate, up), kis_kernels.swiglu_reference(gate64, up64)
    (y * dy).float().sum().backward()
    (y64 * dy.double()).sum().backward()
    check("swiglu", {"y": (y, y64), "dgate": (gate.grad, gate64.grad), "dup": (up.grad, up64.grad)}, dtype)


def test_linear_cross_entropy(target):
    device, dtype = target
    g = torch.Generator(device).manual_seed(3)
    tokens, hidden = SHAPES[device]["tokens"], SHAPES[device]["hidden"][0]
    for vocab in SHAPES[device]["vocab"]:
        h = torch.randn(tokens, hidden, device=device, generator=g)
        w = torch.randn(vocab, hidden, device=device, generator=g) * hidden ** -0.5
        target_ids = torch.randint(0, vocab, (tokens,), device=device, generator=g)
        target_ids[::7] = -100  # ignored positions
        (h, w), (h64, w64) = leaves(h, w, dtype=dtype)
        loss = kis_kernels.linear_cross_entropy(h, w, target_ids)
        loss64 = kis_kernels.linear_cross_entropy_reference(h64, w64, target_ids)
        loss.backward()
        loss64.backward()
        assert loss.dtype == torch.float32
        check(f"linear_cross_entropy[{vocab}]", {"loss": (loss, loss64), "dhidden": (h.grad, h64.grad),
                                                  "dweight": (w.grad, w64.grad)}, dtype, "linear_cross_entropy")
