"""The GPU check's first part: what the machine has, before anything is measured. Versions
(Python, torch and its CUDA, triton, the packages the other parts use), nvidia-smi, a
one-kernel Triton smoke test compiled for the device, and the packages that are missing
(each named, with what goes without it). Writes Markdown to --out; the exit status is 1 when
the device cannot run a Triton kernel (the other parts still run: their own failures say why).

    python3 benchmarks/gpu_preflight.py --out $OUT/preflight.md [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile

# package -> what goes without it (the check itself needs none beyond torch)
PACKAGES = {
    "triton": "the Triton kernels (everything falls back to the PyTorch references)",
    "numpy": "the data path",
    "scipy": "the law fit",
    "yaml": "configs (PyYAML)",
    "sentencepiece": "the tokenizer (data part)",
    "safetensors": "HF export",
    "tqdm": "progress bars",
    "pytest": "the kernel tests part",
    "liger_kernel": "the Liger-Kernel baseline rows of the kernel bench (carry its wheel)",
    "apex": "the apex baseline rows (optional)",
    "transformers": "HF interop tests (not used by the check)",
}


def _version(name: str, mod) -> str:
    """The module's __version__, else its distribution's (Liger-Kernel has no __version__)."""
    from importlib import metadata

    dist = {"yaml": "PyYAML", "liger_kernel": "liger-kernel"}.get(name, name)
    try:
        return getattr(mod, "__version__", None) or metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "?"


def versions() -> list[str]:
    lines = [f"- python {platform.python_version()} ({sys.executable})"]
    for name in ("torch", *PACKAGES):
        try:
            mod = importlib.import_module(name)
        except Exception as e:  # missing, or broken on this machine
            what = PACKAGES.get(name, "")
            lines.append(f"- **{name}: missing** ({type(e).__name__}); without it: {what}")
            continue
        extra = ""
        if name == "torch":
            extra = f", CUDA {mod.version.cuda}, {mod.cuda.device_count()} GPU(s)"
        lines.append(f"- {name} {_version(name, mod)}{extra}")
    return lines


def nvidia_smi() -> str:
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not on the PATH"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                              "--format=csv"], capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi failed: {e}"


def triton_smoke(device: str) -> tuple[bool, str]:
    """Compile and run one vector-add kernel on ``device``; (ok, what happened)."""
    try:
        import torch
        import triton
    except Exception as e:
        return False, f"triton not importable: {type(e).__name__}: {e}"

    # Triton reads a kernel's source from a file: write it to one, then import it.
    src = (
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\n"
        "def add(X, Y, OUT, n, BLOCK: tl.constexpr):\n"
        "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n"
        "    mask = offs < n\n"
        "    tl.store(OUT + offs, tl.load(X + offs, mask=mask) + tl.load(Y + offs, mask=mask), mask=mask)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "kis_smoke_kernel.py"), "w") as f:
            f.write(src)
        sys.path.insert(0, tmp)
        try:
            mod = importlib.import_module("kis_smoke_kernel")
            x = torch.arange(1000, dtype=torch.float32, device=device)
            out = torch.empty_like(x)
            mod.add[(triton.cdiv(1000, 256),)](x, x, out, 1000, BLOCK=256)
            ok = torch.equal(out.cpu(), 2 * x.cpu())
            return ok, f"triton {triton.__version__}: vector add on {device} " + ("correct" if ok else "WRONG")
        except Exception as e:
            return False, f"triton kernel failed on {device}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        finally:
            sys.path.remove(tmp)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="Markdown file to write")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: the rehearsal (Triton through its interpreter)")
    args = ap.parse_args(argv)
    ok, smoke = triton_smoke(args.device)
    text = "\n".join(["### Preflight", "", *versions(), "", "```", nvidia_smi(), "```", "",
                      f"- Triton smoke test: {smoke}", ""])
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, args.out)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
