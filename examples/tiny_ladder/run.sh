#!/usr/bin/env bash
# The tiny ladder, end to end on 2 CPU cores: synthetic worlds -> tokenizer -> token shards ->
# 3 model sizes x 6 infusion amounts (two runs at a time, one thread each) -> metric table ->
# collapse points and the fitted law -> out/tiny_ladder/law/{law.json,report.md,*.png}.
# Re-running skips finished runs. See examples/tiny_ladder/README.md for the design.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=out/tiny_ladder
data=$out/data
start=$(date +%s)
stamp() { echo "[tiny ladder $(( $(date +%s) - start ))s] $*"; }

if [ ! -f $data/READY ]; then
    rm -rf $data
    stamp "generating worlds"
    python tools/make_knowledge.py --out $data/general_world --general-entities 100 \
        --domain-entities 0 --seed 0 --max-probe-facts 250
    mv $data/general_world/general $data/general
    for facts in 32 64 128 256 512 1024; do
        f=$(printf "%04d" $facts)
        python tools/make_knowledge.py --out $data/domain_f$f --general-entities 0 \
            --domain-entities $((facts / 4)) --seed 1 --max-probe-facts 256 > /dev/null
    done
    stamp "training the tokenizer"
    python tools/train_tokenizer.py --input $data/general/train.jsonl $data/domain_f1024/domain/train.jsonl \
        --format jsonl --model-prefix $data/tok/tok --vocab-size 768
    stamp "tokenizing"
    python tools/preprocess_data.py --input $data/general/train.jsonl --doc-key fact_id \
        --output-prefix $data/shards/general --tokenizer-model $data/tok/tok.model --no-progress
    for d in $data/domain_f*; do
        python tools/preprocess_data.py --input $d/domain/train.jsonl --doc-key fact_id \
            --output-prefix $d/shard --tokenizer-model $data/tok/tok.model --no-progress > /dev/null
    done
    touch $data/READY
fi
[ "${1:-}" = "--data-only" ] && exit 0

stamp "training the ladder"
OMP_NUM_THREADS=1 python tools/sweep.py examples/tiny_ladder/sweep.yaml --jobs 2
stamp "extracting metrics and fitting the law"
python tools/extract_metrics.py $out/runs/* --out $out/table.csv
python tools/fit_law.py --table $out/table.csv --out $out/law --metric retention/domain --chance auto \
    --predict 1e7
stamp "done: $out/law/report.md"
