#!/usr/bin/env bash
# The GPU check rehearsed on a CPU machine, as the bare GPU machine would run it: a venv with
# exactly that machine's versions (Python 3.12 where this machine has it, torch 2.11.0,
# triton 3.6.0 and the Python packages its image lists; the project NOT installed), then
#   1. bash benchmarks/gpu_check.sh --dry-run       (the parts and caps of the real call)
#   2. bash benchmarks/gpu_check.sh --cpu           (every part at CPU sizes: preflight, the GPU
#      kernel tests through Triton's interpreter, the data step, the kernel bench on CPU, a
#      few training steps), its report in out/gpu_rehearsal/report.md
#   3. the fast test tier under these versions (setup.py's floor), with the tree on PYTHONPATH
# and prints one summary. torch 2.11.0 comes from the package index as its CUDA build (about
# 3 GB with the nvidia libraries); it installs and runs on a CPU machine. The venv is kept in
# $VENV (default ~/.cache/kis-megatron/gpu-rehearsal) and reused while its versions match.
#
#   bash benchmarks/gpu_rehearsal.sh             # about 15-25 minutes on 2 cores, after the install
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH=2.11.0 TRITON=3.6.0
# The image's packages the project and its tests use (versions as KINDS.md lists them where it
# does; megatron-core and Liger-Kernel are not there, so their tests skip).
PACKAGES="numpy scipy pyyaml sentencepiece safetensors tqdm pytest pytest-timeout hypothesis
          tensorboard matplotlib transformers==5.17.0"
VENV=${VENV:-$HOME/.cache/kis-megatron/gpu-rehearsal}
OUT=${OUT:-out/gpu_rehearsal}
BASE=$(command -v python3.12 || command -v python3)

if ! "$VENV/bin/python" -c "import torch, triton, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH' or triton.__version__ != '$TRITON')" 2>/dev/null; then
    echo "== building $VENV with $($BASE --version), torch $TORCH, triton $TRITON, $PACKAGES"
    rm -rf "$VENV" && "$BASE" -m venv "$VENV" || exit 2
    "$VENV/bin/pip" install -q "torch==$TORCH" "triton==$TRITON" $PACKAGES || exit 2
fi
# Triton 3.6's interpreter fails on NumPy >= 2.4 (it turns 1-element arrays into ints, which
# NumPy 2.4+ refuses: any range() over a kernel argument raises). The GPU machine compiles its
# kernels and never interprets them; here the interpreted parts get an older NumPy of their own.
if [ ! -d "$VENV/interpreter-numpy/numpy" ]; then
    "$VENV/bin/pip" install -q --target "$VENV/interpreter-numpy" "numpy<2.4" || exit 2
fi
export INTERPRETER_PYTHONPATH="$VENV/interpreter-numpy"
PY="$VENV/bin/python"
if (cd / && "$PY" -c "import kis_megatron" 2>/dev/null); then
    echo "error: kis_megatron is importable in $VENV without PYTHONPATH: the rehearsal needs it not installed" >&2
    exit 2
fi
mkdir -p "$OUT"
echo "== 1. dry run"
bash benchmarks/gpu_check.sh --dry-run | tee "$OUT/dry_run.txt"
echo "== 2. the check's parts on CPU"
PYTHON="$PY" OUT="$OUT" bash benchmarks/gpu_check.sh --cpu
echo "== 3. the fast tier under torch $TORCH / triton $TRITON"
start=$SECONDS
PYTHONPATH="$ROOT" OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider -m "not slow and not multiprocess" \
    > "$OUT/fast_tier.log" 2>&1
rc=$?
echo "fast tier: exit $rc in $((SECONDS - start)) s: $(tail -n 1 "$OUT/fast_tier.log")" | tee "$OUT/fast_tier.txt"
echo
echo "== summary ($("$PY" -c 'import sys, torch, triton; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__}")'))"
cut -f1-3 "$OUT/parts.tsv"
cat "$OUT/fast_tier.txt"
echo "report: $OUT/report.md"
