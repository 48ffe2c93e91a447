#!/usr/bin/env bash
# The one GPU check, about 6-8 minutes on one GPU (each part has a time cap; the caps add up
# to 460 s with one GPU, 550 s with two). Run from anywhere, on a machine with CUDA:
#
#   bash benchmarks/gpu_check.sh              # run every part, append a dated section to RESULTS.md
#   bash benchmarks/gpu_check.sh --dry-run    # print what it would run, run nothing
#
# Parts (logs and outputs under $OUT, default out/gpu_check):
#   kernel_tests  tests/kernels/test_kernels_gpu.py: every kernel compiled by Triton, bf16 and
#                 fp32, against float64 references at the model's shapes (errors recorded)
#   data          the tiny ladder's data (tokenizer, shards) for the two training parts
#   kernel_bench  benchmarks/bench_kernels.py: ours against eager, torch.compile, Liger-Kernel
#                 (when installed) and apex (when installed), bf16
#   layouts_nccl  with two GPUs or more: benchmarks/gpu_layouts.py, tp=2 / dp=2 / pp=2 / tp=2+sp
#                 under NCCL against one process (fp32)
#   train_125m    benchmarks/bench_gpu_train.sh: 125M preset, seq 2048, tokens/s and MFU (1
#                 process, and 2 data-parallel processes with two GPUs)
# then benchmarks/gpu_check_report.py appends the results to $RESULTS (benchmarks/RESULTS.md).
# A part that fails or runs out of time is reported as such; the others still run.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-out/gpu_check}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
PY=${PYTHON:-python}
if [ $DRY = 1 ]; then
    NGPU=${NGPU:-1}
else
    NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    if [ "$NGPU" -lt 1 ]; then
        echo "error: no CUDA device visible (torch.cuda.device_count() = 0); nothing to check" >&2
        exit 2
    fi
    rm -rf "$OUT" && mkdir -p "$OUT"
fi
DATA=out/tiny_ladder/data
NPROCS=1
[ "$NGPU" -ge 2 ] && NPROCS=2

# part NAME CAP_SECONDS COMMAND...: run COMMAND with a time cap, log to $OUT/NAME.log and
# record "NAME status seconds command" in $OUT/parts.tsv.
part() {
    local name=$1 cap=$2
    shift 2
    if [ $DRY = 1 ]; then
        printf '%-13s (cap %3ss) %s\n' "$name" "$cap" "$*"
        return 0
    fi
    echo "== $name (cap ${cap}s): $*"
    local start=$SECONDS status
    timeout --kill-after=10 "$cap" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    case $status in
        0) status=ok ;;
        124|137) status="timed out after ${cap}s" ;;
        *) status="failed (exit $status)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" "$*" >> "$OUT/parts.tsv"
    echo "   $status in $((SECONDS - start))s; log $OUT/$name.log"
}

part kernel_tests 100 env TRITON_INTERPRET=0 KIS_GPU_ERRORS="$OUT/kernel_errors.jsonl" \
    $PY -m pytest -q -rs -p no:cacheprovider tests/kernels/test_kernels_gpu.py
part data 90 bash examples/tiny_ladder/run.sh --data-only
part kernel_bench 150 $PY benchmarks/bench_kernels.py --reps 20 --out "$OUT/kernel_bench.md"
if [ "$NGPU" -ge 2 ]; then
    part layouts_nccl 90 $PY benchmarks/gpu_layouts.py --train $DATA/shards/general \
        --tokenizer $DATA/tok/tok.model --out "$OUT/layouts.md"
fi
part train_125m 120 env STEPS=30 NPROCS=$NPROCS OUT="$OUT/train" bash benchmarks/bench_gpu_train.sh
if [ $DRY = 1 ]; then
    echo "then: $PY benchmarks/gpu_check_report.py $OUT --results $RESULTS  (GPUs: $NGPU; set NGPU=2 to see the two-GPU parts)"
    exit 0
fi
$PY benchmarks/gpu_check_report.py "$OUT" --results "$RESULTS"
