"""Every kernel compiles for sm_80, sm_90 and sm_100 at the launch configurations its
launcher chooses for the shipped presets (125m-7b, vocabularies 32k and 128k, tp 1-8,
bf16 and fp32), with no spills, registers within the register file and shared memory
within the target's limit. Triton's real compiler and ptxas, no GPU (``kis_kernels.aot``).

The compile runs in a child process without ``TRITON_INTERPRET`` (this folder's conftest
sets it, and the interpreter cannot compile). Results are cached (``kis_kernels.aot.cache_dir``):
450 compiles, ~40-75 s cold on 2 cores, ~2 s warm."""

import importlib
import json
import os
import subprocess
import sys

import pytest
import torch

from kis_kernels import aot

pytestmark = [pytest.mark.slow]  # Triton's compiler and ptxas: ~40-75 s cold

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "benchmarks", "bench_kernel_resources.py")


def _child(args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k not in ("KIS_KERNELS", "TRITON_INTERPRET")}
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def compiled():
    proc = _child([SCRIPT, "--json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if proc.stdout.startswith("SKIP:"):
        pytest.skip(proc.stdout.strip())
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_every_kernel_compiles_for_every_target_without_spills(compiled):
    bad = [(r["arch"], r["launch"], r["problems"]) for r in compiled if r["problems"]]
    assert not bad, "\n".join(map(str, bad))
    from kis_megatron.model.presets import kernel_shapes

    launches = {l for s in kernel_shapes() for d in ("bf16", "fp32") for l in aot.op_launches(**s, dtype=d)}
    assert len(compiled) == 3 * len(launches)
    kernels = {r["launch"].split("[")[0] for r in compiled}
    assert kernels == {"rms_norm_forward_kernel", "rms_norm_backward_kernel", "rope_kernel",
                       "swiglu_forward_kernel", "swiglu_backward_kernel", "ce_stats_kernel", "ce_grad_kernel"}
    assert {r["arch"] for r in compiled} == {80, 90, 100}
    # The launches cover the configurations the presets reach: e.g. the 3B/7B norm rows.
    assert any("BLOCK=4096" in r["launch"] and "rms_norm_backward" in r["launch"] for r in compiled)


def test_spills_and_limits_are_detected():
    """The checker is not vacuous: a register cap forces spills, which it reports."""
    code = ("from kis_kernels import aot\n"
            "l = [l for l in aot.op_launches(4096, 32, 32, 128, 4000, 'fp32')"
            " if l.kernel == '_rms_norm_backward_kernel'][0]\n"
            "print(aot.cuda_compiler_available() or aot.problems(aot.compile_launch(l, 90, maxnreg=32), 90))")
    proc = _child(["-c", code], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "spills" not in proc.stdout:
        assert "Error" in proc.stdout, proc.stdout  # no compiler here: said why
        pytest.skip(proc.stdout)
    fine = {"regs": 64, "stack": 0, "local": 0, "static_shared": 1024, "shared": 32, "threads": 256}
    assert aot.problems(fine, 80) == []
    assert "shared memory" in aot.problems({**fine, "shared": 200 * 1024}, 80)[0]  # fits sm_90, not A100
    assert aot.problems({**fine, "shared": 200 * 1024}, 90) == []
    assert "register file" in aot.problems({**fine, "regs": 255, "threads": 512}, 90)[0]


class _Recorder:
    """Stands in for a LazyKernel: records what the launcher passes instead of launching."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _kind(value):
    if isinstance(value, torch.Tensor):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64"}[value.dtype]
    if isinstance(value, int):
        return aot._int(value)
    return type(value).__name__


def test_launch_descriptions_match_what_the_launchers_pass(monkeypatch):
    """kis_kernels.aot describes each launch (argument names and types, constants, num_warps);
    the real launchers, run with the kernels replaced by recorders, pass exactly that."""
    dim, heads, head_dim, vocab, rows = 768, 12, 64, 4000, 63
    modules = {n: importlib.import_module(f"kis_kernels.ops.{n}")
               for n in ("rms_norm", "rope", "swiglu", "linear_cross_entropy")}
    calls = {}
    for name, module in modules.items():
        for attr in dir(module):
            if attr.endswith("_kernel"):
                calls[attr] = []
                monkeypatch.setattr(module, attr, _Recorder(calls[attr]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, dim, generator=gen)
    w = torch.randn(dim, generator=gen)
    R, P, S, C = modules.values()
    y, rstd = R.rms_norm_forward(x, w, 1e-5)
    R.rms_norm_backward(x, x, w, rstd)
    q = torch.randn(1, rows, heads, head_dim, generator=gen)
    cos = torch.randn(rows, head_dim // 2, generator=gen)
    P.rope_forward(q, cos, cos)
    P.rope_backward(q, cos, cos)
    S.swiglu_forward(x, x)
    S.swiglu_backward(x, x, x)
    C.linear_cross_entropy_forward(x, torch.randn(vocab, dim, generator=gen), torch.arange(rows))

    described = {(l.kernel, tuple(v.dtype if isinstance(v, aot.Ptr) else _kind(v) for _, v in l.args),
                  tuple(sorted({**dict(l.constexprs), "num_warps": l.num_warps}.items())))
                 for l in aot.op_launches(dim, heads, heads, head_dim, vocab, "fp32")}
    for kernel, recorded in calls.items():
        assert recorded, kernel
        for args, kwargs in recorded:
            key = (kernel, tuple(_kind(a) for a in args), tuple(sorted(kwargs.items())))
            assert key in described, key
