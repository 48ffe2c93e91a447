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
    # One domain world of 2048 facts (512 compounds x 4 relations) with a probe for every
    # fact: a run infuses its first infusion.facts of them (nested levels, any number).
    python tools/make_knowledge.py --out $data/domain_world --general-entities 0 \
        --domain-entities 512 --seed 1
    mv $data/domain_world/domain $data/domain
    stamp "training the tokenizer"
    python tools/train_tokenizer.py --input $data/general/train.jsonl $data/domain/train.jsonl \
        --format jsonl --model-prefix $data/tok/tok --vocab-size 768
    stamp "tokenizing"
    for world in general domain; do
        python tools/preprocess_data.py --input $data/$world/train.jsonl --doc-key fact_id \
            --output-prefix $data/shards/$world --tokenizer-model $data/tok/tok.model --no-progress
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
