#!/usr/bin/env bash
# The one GPU check: every GPU figure the project lacks, in one call of about 8-9 minutes on a
# bare machine (python3 with torch and triton, the working tree not installed, no network).
# Each part has a time cap; the caps add up to 470 s with one GPU, 540 s with two.
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run    # list the parts and caps, run nothing
#   bash benchmarks/gpu_check.sh --cpu        # the rehearsal on a CPU (benchmarks/gpu_rehearsal.sh)
#
# Parts:
#   preflight     benchmarks/gpu_preflight.py: versions, nvidia-smi, a one-kernel Triton smoke
#                 test, the missing packages named
#   kernel_tests  tests/kernels/test_kernels_gpu.py: every kernel compiled by Triton, bf16 and
#                 fp32, against float64 references at the model's shapes (errors recorded)
#   data          the tiny ladder's data (tokenizer, shards) for the training part
#   kernel_bench  benchmarks/bench_kernels.py: ours against eager, torch.compile, Liger-Kernel
#                 (when installed or carried) and apex (when installed), bf16; rows written as
#                 they finish, so a cap loses only the rows not reached
#   layouts_nccl  with two GPUs or more: benchmarks/gpu_layouts.py, tp=2 / dp=2 / pp=2 / tp=2+sp
#                 under NCCL against one process (fp32)
#   train_125m    benchmarks/bench_gpu_train.sh: 125M preset, seq 2048, tokens/s and MFU
# After every part benchmarks/gpu_check_report.py rewrites $OUT/report.md with all results so
# far (a call cut short still returns a report). A part that fails or runs out of time is
# reported as such; the others still run.
#
# What it writes: into $OUT (default out/gpu_check) at most 8 files: report.md, check.log
# (every part's output), parts.tsv, preflight.md, kernel_errors.jsonl, kernel_bench.md,
# train.md and, with two GPUs, layouts.md. Everything else (data, run directories, carried
# wheels' install) goes to $WORK (default a fresh folder under /tmp). It removes nothing but
# those files of its own.
#
# Carried wheels: *.whl in $WHEELS (default .whl in the repository; made by
# benchmarks/gpu_prep.sh) are installed offline into $WORK/site, which goes on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
case "${1:-}" in
    --dry-run) MODE=dry ;;
    --cpu) MODE=cpu ;;
    "") ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run | --cpu]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-out/gpu_check}
WHEELS=${WHEELS:-.whl}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [ $MODE = dry ]; then
    NGPU=${NGPU:-1}
else
    command -v "$PY" > /dev/null || { echo "error: no $PY on the PATH (set PYTHON)" >&2; exit 2; }
    WORK=${WORK:-$(mktemp -d /tmp/kis_gpu_check.XXXXXX)}
    mkdir -p "$OUT" "$WORK" || exit 2
    for f in report.md check.log parts.tsv preflight.md kernel_errors.jsonl kernel_bench.md train.md layouts.md; do
        rm -f "$OUT/$f"  # this script's own files from an earlier call, nothing else
    done
    if compgen -G "$WHEELS/*.whl" > /dev/null; then
        echo "== installing carried wheels from $WHEELS into $WORK/site" | tee -a "$OUT/check.log"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$WORK/site" "$WHEELS"/*.whl >> "$OUT/check.log" 2>&1 \
            && export PYTHONPATH="$WORK/site:$PYTHONPATH" \
            || echo "   the wheels did not install (see check.log); going on without them" | tee -a "$OUT/check.log"
    fi
    if [ $MODE = gpu ]; then
        NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
        if [ "$NGPU" -lt 1 ]; then
            echo "error: no CUDA device visible (torch.cuda.device_count() = 0); for a rehearsal use --cpu" >&2
            exit 2
        fi
    else
        NGPU=0
    fi
fi
NPROCS=1
[ "${NGPU:-1}" -ge 2 ] && NPROCS=2

report() {
    "$PY" benchmarks/gpu_check_report.py "$OUT" --mode $MODE >> "$OUT/check.log" 2>&1 \
        || echo "   (the report could not be written; see check.log)"
}

# part NAME CAP_SECONDS COMMAND...: run COMMAND under a time cap, its output appended to
# $OUT/check.log; record "NAME, status, seconds, command, last line" in $OUT/parts.tsv.
part() {
    local name=$1 cap=$2
    shift 2
    if [ $MODE = dry ]; then
        printf '%-13s (cap %3ss) %s\n' "$name" "$cap" "$*"
        return 0
    fi
    echo "== $name (cap ${cap}s): $*"
    local start=$SECONDS status log="$WORK/$name.log"
    timeout --kill-after=10 "$cap" "$@" > "$log" 2>&1
    status=$?
    case $status in
        0) status=ok ;;
        124|137) status="timed out after ${cap}s" ;;
        *) status="failed (exit $status)" ;;
    esac
    { echo "== $name: $status in $((SECONDS - start))s: $*"; cat "$log"; echo; } >> "$OUT/check.log"
    local last
    last=$(grep -v '^\s*$' "$log" | tail -n 1 | tr '\t' ' ' | cut -c1-300)
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$*" "$last" >> "$OUT/parts.tsv"
    echo "   $status in $((SECONDS - start))s"
    report
}

if [ $MODE = cpu ]; then  # the rehearsal: the same parts at CPU sizes, Triton interpreted
    # INTERPRETER_PYTHONPATH: what the interpreted parts put first (gpu_rehearsal.sh: an older
    # NumPy, which Triton 3.6's interpreter needs)
    INTERP="${INTERPRETER_PYTHONPATH:+$INTERPRETER_PYTHONPATH:}$PYTHONPATH"
    part preflight 60 env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_preflight.py --device cpu --out "$OUT/preflight.md"
    part kernel_tests 600 env PYTHONPATH="$INTERP" TRITON_INTERPRET=1 KIS_GPU_ERRORS="$OUT/kernel_errors.jsonl" \
        "$PY" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_kernels_gpu.py
    part data 300 env PYTHON="$PY" bash examples/tiny_ladder/run.sh --data-only
    part kernel_bench 600 env PYTHONPATH="$INTERP" TRITON_INTERPRET=1 KIS_KERNELS=triton "$PY" benchmarks/bench_kernels.py \
        --device cpu --reps 2 --out "$OUT/kernel_bench.md"
    part train_125m 600 env PYTHON="$PY" DEVICE=cpu PRESET=tiny STEPS=12 SEQ=64 MICRO=2 NPROCS=1 \
        OUT="$WORK/train" TABLE="$OUT/train.md" bash benchmarks/bench_gpu_train.sh model.vocab_size=768
    exit 0
fi
part preflight 20 "$PY" benchmarks/gpu_preflight.py --out "${OUT:-out/gpu_check}/preflight.md"
part kernel_tests 90 env TRITON_INTERPRET=0 KIS_GPU_ERRORS="$OUT/kernel_errors.jsonl" \
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/kernels/test_kernels_gpu.py
part data 60 env PYTHON="$PY" bash examples/tiny_ladder/run.sh --data-only
part kernel_bench 190 "$PY" benchmarks/bench_kernels.py --reps 20 --out "$OUT/kernel_bench.md"
if [ "$NGPU" -ge 2 ]; then
    part layouts_nccl 70 "$PY" benchmarks/gpu_layouts.py --train out/tiny_ladder/data/shards/general \
        --tokenizer out/tiny_ladder/data/tok/tok.model --out "$OUT/layouts.md"
fi
part train_125m 110 env PYTHON="$PY" STEPS=30 NPROCS=$NPROCS OUT="${WORK:-/tmp/kis_gpu_check}/train" \
    TABLE="$OUT/train.md" bash benchmarks/bench_gpu_train.sh
if [ $MODE = dry ]; then
    echo "then: $PY benchmarks/gpu_check_report.py $OUT after every part -> $OUT/report.md (GPUs: $NGPU; set NGPU=2 to see the two-GPU part)"
    exit 0
fi
echo "report: $OUT/report.md"
