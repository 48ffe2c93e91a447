#!/usr/bin/env bash
# Training throughput and MFU of the trainer on the GPUs of one machine, under torchrun: one
# process, then NPROCS processes data-parallel over NCCL (several processes may share one
# GPU: rank r uses GPU r mod the GPU count; NCCL may refuse that, and the table then says
# so). Data: the tiny ladder's general shard (made on the CPU first, ~1 minute), repeated as
# needed; throughput does not depend on what the tokens say.
#
#   bash benchmarks/bench_gpu_train.sh              # 125M, seq 2048, 40 steps, 1 and 2 processes
#   PRESET=350m STEPS=60 NPROCS=2 bash benchmarks/bench_gpu_train.sh
#
# Prints a Markdown table (median tokens/s and MFU over the steps after the first 10) to
# paste into benchmarks/RESULTS.md (also written to $TABLE when set). Extra arguments are
# passed to kis-train as overrides. PYTHON names the interpreter (default python3); the
# project need not be installed (the repository goes on PYTHONPATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PRESET=${PRESET:-125m} STEPS=${STEPS:-40} SEQ=${SEQ:-2048} MICRO=${MICRO:-8} NPROCS=${NPROCS:-2}
OUT=${OUT:-out/bench_gpu_train}
PYTHON=$PY bash examples/tiny_ladder/run.sh --data-only
data=out/tiny_ladder/data
mkdir -p "$OUT" && rm -rf "$OUT"/np[0-9]*  # its own runs only
common=(model.preset=$PRESET model.max_seq_len=$SEQ data.seq_len=$SEQ
        data.train=$data/shards/general data.tokenizer=$data/tok/tok.model
        train.steps=$STEPS train.micro_batch=$MICRO train.warmup_steps=5 train.device=${DEVICE:-cuda}
        log.interval=1 log.progress=none log.tensorboard=false checkpoint.save_final=false "$@")
counts=1
[ "$NPROCS" -gt 1 ] && counts="1 $NPROCS"
for n in $counts; do
    echo "== $n process(es)"
    if ! "$PY" -m torch.distributed.run --standalone --nproc-per-node "$n" -m kis_megatron.train "${common[@]}" \
            train.global_batch=$((MICRO * n)) log.dir="$OUT/np$n" > "$OUT.np$n.log" 2>&1; then
        echo "failed: $OUT.np$n.log ends with:"
        tail -n 3 "$OUT.np$n.log"
    fi
done
"$PY" - "$OUT" "$PRESET" "$SEQ" "$MICRO" <<'PY' | tee "${TABLE:-/dev/null}"
import json, statistics, sys
from pathlib import Path
import torch
out, preset, seq, micro = sys.argv[1:]
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"\n{gpu}, torch {torch.__version__}, preset {preset}, seq {seq}, micro-batch {micro} per process, "
      "train.dtype=auto (bf16 autocast on CUDA)\n")
print("| processes | tokens/s (all) | TFLOP/s per process | MFU |\n|---|---|---|---|")
for run in sorted(Path(out).glob("np*")):
    metrics = run / "metrics.jsonl"
    rows = [json.loads(l) for l in metrics.read_text().splitlines()] if metrics.exists() else []
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > 10]
    if not rows:
        print(f"| {run.name[2:]} | failed (see {out}.{run.name}.log) | | |")
        continue
    med = lambda k: statistics.median(r[k] for r in rows) if k in rows[0] else float("nan")
    mfu = f"{med('mfu'):.1%}" if "mfu" in rows[0] else "n/a (no known peak)"
    print(f"| {run.name[2:]} | {med('tokens_per_s'):,.0f} | {med('tflops_per_device'):.1f} | {mfu} |")
PY
