"""Ahead-of-time compilation of the kernels for real GPU targets, with no GPU present.

Triton's interpreter (how the CPU tests run the kernels) cannot see what only the GPU
compiler sees: register pressure, spills to local memory, shared memory beyond the
target's limit, loop-carried type errors. Triton's own compiler and the ``ptxas`` shipped
in its wheel build a cubin for any ``GPUTarget`` without a device, so this module compiles
each kernel exactly as its launcher would launch it and reads the binary's resources:

- :func:`op_launches` lists the launches of every kernel for one model shape (hidden size,
  heads per rank, head dim, vocabulary shard) and dtype, taking BLOCK sizes and num_warps
  from the launchers' own pure functions (``rms_norm_launch_config`` ...), so the check
  cannot drift from what runs. Argument types and Triton's specialisations (16-byte
  alignment of pointers, integers divisible by 16, integers equal to 1) are derived from
  sample argument values the way ``triton.jit`` derives them at launch. Sizes that vary per
  call (token counts) are compiled twice: a multiple of 16 (the usual batch) and a value
  that is neither that nor 1 (the general variant, which any odd batch hits).
- :func:`compile_launch` compiles one launch for one target and returns its registers per
  thread, stack/local bytes per thread (where ptxas puts spills), static and dynamic shared
  memory, read with ``cuobjdump --dump-resource-usage`` from the cubin itself. Results are
  cached as JSON under ``$KIS_AOT_CACHE`` (default ``~/.cache/kis-megatron/aot``), keyed by
  the kernel's source hash (Triton's ``cache_key``, which covers what it calls), the
  signature, specialisations, options, target and Triton version.
- :func:`problems` says what is wrong with a result: spills, too many registers for the
  block, shared memory past the target's opt-in limit.

Imports triton only when called (``kis_kernels`` never imports it eagerly). Used by
``tests/kernels/test_kernels_compile.py`` and ``benchmarks/bench_kernel_resources.py``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kis_kernels.ops.linear_cross_entropy import linear_cross_entropy_launch_config
from kis_kernels.ops.rms_norm import rms_norm_launch_config
from kis_kernels.ops.rope import rope_launch_config
from kis_kernels.ops.swiglu import swiglu_launch_config

# Per-block limits of the targets (CUDA C Programming Guide, compute capabilities table):
# max shared memory per block with opt-in, registers per block; 255 registers per thread.
TARGETS = {
    80: {"name": "sm_80 (A100)", "max_shared": 163 * 1024, "regs_per_block": 65536},
    90: {"name": "sm_90 (H100/H200)", "max_shared": 227 * 1024, "regs_per_block": 65536},
    100: {"name": "sm_100 (B200)", "max_shared": 227 * 1024, "regs_per_block": 65536},
}
MAX_REGS_PER_THREAD = 255
_GENERAL = 1001  # a per-call size: not a multiple of 16 and not 1 (Triton's general variant)


@dataclass(frozen=True)
class Ptr:
    """A tensor argument in a launch description: its element type (Triton's name)."""

    dtype: str  # "bf16", "fp32", "i64"


@dataclass(frozen=True)
class Launch:
    """One kernel launch configuration: which kernel, its runtime argument sample values
    (in the kernel's order), its compile-time constants and num_warps."""

    op: str  # the op module under kis_kernels/ops/, e.g. "rms_norm"
    kernel: str  # the kernel's name in that module, e.g. "_rms_norm_forward_kernel"
    dtype: str  # data dtype of the launch (for the tables)
    args: tuple  # ((name, Ptr | int | float), ...)
    constexprs: tuple  # ((name, value), ...)
    num_warps: int

    def label(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs)
        return f"{self.kernel.strip('_')}[{self.dtype}; {consts}; warps={self.num_warps}]"


def _int(v: int) -> int:
    """A representative of ``v``'s class under Triton's integer specialisation (1 becomes a
    constant; multiples of 16 get a divisibility hint; int64 beyond int32), so launches that
    compile to the same code compare equal."""
    if v == 1:
        return 1
    big = 0 if -2**31 <= v < 2**31 else 2**32
    return big + (16 if v % 16 == 0 else 17)


def _split(cfg: dict) -> tuple[tuple, int]:
    cfg = dict(cfg)
    warps = cfg.pop("num_warps")
    return tuple(sorted(cfg.items())), warps


def op_launches(dim: int, n_heads: int, n_kv_heads: int, head_dim: int, vocab_local: int,
                dtype: str) -> list[Launch]:
    """Every kernel launch one rank makes for a model of these per-rank sizes (heads and
    vocabulary already divided by tensor parallelism) with data in ``dtype``. Sizes that
    vary per call (token counts) come in two variants: multiples of 16 (the usual batch)
    and a general value."""
    out = []
    for n in (16 * _GENERAL, _GENERAL):
        out += _launches(dim, n_heads, n_kv_heads, head_dim, vocab_local, dtype, n)
    return list(dict.fromkeys(Launch(l.op, l.kernel, l.dtype,
                                     tuple((k, _int(v) if isinstance(v, int) else v) for k, v in l.args),
                                     l.constexprs, l.num_warps) for l in out))


def _launches(dim, n_heads, n_kv_heads, head_dim, vocab_local, dtype, n) -> list[Launch]:
    p, f32 = Ptr(dtype), Ptr("fp32")
    out = []
    consts, warps = _split(rms_norm_launch_config(dim))
    out.append(Launch("rms_norm", "_rms_norm_forward_kernel", dtype, (
        ("X", p), ("stride_x", dim), ("W", p), ("Y", p), ("stride_y", dim), ("RSTD", f32),
        ("n_cols", dim), ("eps", 1e-5)), consts, warps))
    out.append(Launch("rms_norm", "_rms_norm_backward_kernel", dtype, (
        ("DY", p), ("stride_dy", dim), ("X", p), ("stride_x", dim), ("W", p), ("RSTD", f32),
        ("DX", p), ("stride_dx", dim), ("DW_PARTIAL", f32),
        ("n_rows", n), ("n_cols", dim), ("rows_per_program", n)), consts, warps))
    for heads in sorted({n_heads, n_kv_heads}):  # q and k
        consts, warps = _split(rope_launch_config(heads, head_dim))
        stride_s = heads * head_dim
        for sign in (1.0, -1.0):  # forward, backward
            out.append(Launch("rope", "_rope_kernel", dtype, (
                ("X", p), ("stride_xb", n * stride_s), ("stride_xs", stride_s), ("stride_xh", head_dim),
                ("Y", p), ("stride_yb", n * stride_s), ("stride_ys", stride_s), ("stride_yh", head_dim),
                ("COS", f32), ("SIN", f32), ("stride_cs", head_dim // 2),
                ("seq_len", n), ("n_heads", heads), ("half", head_dim // 2)),
                (("SIGN", sign),) + consts, warps))
    consts, warps = _split(swiglu_launch_config())
    out.append(Launch("swiglu", "_swiglu_forward_kernel", dtype, (
        ("GATE", p), ("UP", p), ("Y", p), ("n_elements", n)), consts, warps))
    out.append(Launch("swiglu", "_swiglu_backward_kernel", dtype, (
        ("DY", p), ("GATE", p), ("UP", p), ("DGATE", p), ("DUP", p), ("n_elements", n)), consts, warps))
    consts, warps = _split(linear_cross_entropy_launch_config(vocab_local))
    # vocab_start is 0 on rank 0 (divisible by 16) and rank * vocab_local elsewhere.
    common = (("n_cols", vocab_local), ("vocab_start", vocab_local), ("ignore_index", -100))
    out.append(Launch("linear_cross_entropy", "_ce_stats_kernel", dtype, (
        ("LOGITS", p), ("stride_l", vocab_local), ("TARGET", Ptr("i64")), ("ROW_MAX", f32),
        ("ROW_SUMEXP", f32), ("ROW_TARGET", f32)) + common, consts, warps))
    out.append(Launch("linear_cross_entropy", "_ce_grad_kernel", dtype, (
        ("LOGITS", p), ("stride_l", vocab_local), ("TARGET", Ptr("i64")), ("LSE", f32)) + common,
        consts, warps))
    return out


# ---------------------------------------------------------------------------- compiling


def _jitted(launch: Launch):
    module = importlib.import_module(f"kis_kernels.ops.{launch.op}")
    return getattr(module, launch.kernel).jitted()


def _specialise(fn, launch: Launch) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as ``triton.jit`` derives them from these arguments."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    given = dict(launch.args) | dict(launch.constexprs)
    if sorted(given) != sorted(fn.arg_names):
        raise ValueError(f"{launch.kernel}: launch describes {sorted(given)}, the kernel takes "
                         f"{fn.arg_names}: update kis_kernels/aot.py with the kernel")
    consts = dict(launch.constexprs)
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name], constexprs[name] = "constexpr", consts[name]
            continue
        value = given[name]
        if isinstance(value, Ptr):
            ty, spec = f"*{value.dtype}", "D"  # torch allocations are 16-byte aligned
        else:
            ty, spec = native_specialize_impl(BaseBackend, value, False, not isinstance(value, float), True)
        if ty == "constexpr":  # an integer equal to 1 becomes a constant, as at launch
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = ty
        if spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    return signature, constexprs, attrs


def cache_dir() -> Path:
    root = os.environ.get("KIS_AOT_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kis-megatron" / "aot"


def _resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                              text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, shared, local = map(int, m.groups())
    return {"regs": regs, "stack": stack, "static_shared": shared, "local": local}


def compile_launch(launch: Launch, arch: int, maxnreg: int | None = None) -> dict:
    """Compile ``launch`` for ``sm_<arch>`` and return its resources: ``regs`` (per thread),
    ``stack`` and ``local`` (bytes per thread: spills land there), ``static_shared`` and
    ``shared`` (dynamic, what Triton requests at launch) in bytes, and ``threads``.
    ``maxnreg`` caps registers (for testing the spill detection). Raises on a compile error."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jitted(launch)
    signature, constexprs, attrs = _specialise(fn, launch)
    # Fusion on, as Triton 3.9 defaults at launch (explicit, which also silences its warning).
    options = {"num_warps": launch.num_warps, "enable_fp_fusion": True}
    if maxnreg is not None:
        options["maxnreg"] = maxnreg
    key = json.dumps([triton.__version__, fn.cache_key, signature, repr(sorted(constexprs.items())),
                      repr(sorted(attrs.items())), options, arch], sort_keys=True)
    cached = cache_dir() / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    result = _resource_usage(compiled.asm["cubin"], knobs.nvidia.cuobjdump.path)
    result.update(shared=int(compiled.metadata.shared), threads=32 * launch.num_warps)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, cached)
    return result


def problems(result: dict, arch: int) -> list[str]:
    """What makes this compiled kernel unfit for ``sm_<arch>`` (empty when nothing)."""
    limits, out = TARGETS[arch], []
    if result["stack"] or result["local"]:
        out.append(f"spills or local memory: {result['stack']} B stack, {result['local']} B local per thread")
    if result["regs"] > MAX_REGS_PER_THREAD or result["regs"] * result["threads"] > limits["regs_per_block"]:
        out.append(f"{result['regs']} registers x {result['threads']} threads exceed the register file")
    shared = result["shared"] + result["static_shared"]
    if shared > limits["max_shared"]:
        out.append(f"{shared} B shared memory > {limits['max_shared']} B on {limits['name']}")
    return out


def cuda_compiler_available() -> str | None:
    """None when triton's CUDA compiler (and its ptxas, cuobjdump) can be used here, else why not."""
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401

        for tool in (knobs.nvidia.ptxas, knobs.nvidia.ptxas_blackwell, knobs.nvidia.cuobjdump):
            tool.path  # noqa: B018  (raises when the binary is missing)
    except Exception as e:  # ImportError, RuntimeError from a missing tool
        return repr(e)
    return None
