#!/usr/bin/env bash
# The tiny ladder, end to end on 2 CPU cores: synthetic worlds -> tokenizer -> token shards ->
# 4 model sizes x infusion levels, refined where each collapse is least known (two runs at a
# time, one thread each) -> the law fitted on them -> the runs of a 2x larger held-out model
# around its predicted collapse point -> the law checked against that model's measured
# collapse (2 seeds) -> the recommendation for a model 2x the validated size ->
# out/tiny_ladder/law/{law.json,report.md,*.png}. Re-running skips finished runs.
# See examples/tiny_ladder/README.md for the design and its validation protocol.
set -euo pipefail
PY=${PYTHON:-python}  # the interpreter; a bare machine may only have python3
cd "$(dirname "$0")/../.."
out=out/tiny_ladder
data=$out/data
start=$(date +%s)
stamp() { echo "[tiny ladder $(( $(date +%s) - start ))s] $*"; }

if [ ! -f $data/READY ]; then
    rm -rf $data
    stamp "generating worlds"
    "$PY" tools/make_knowledge.py --out $data/general_world --general-entities 100 \
        --domain-entities 0 --seed 0 --max-probe-facts 250
    mv $data/general_world/general $data/general
    # One domain world of 2048 facts (512 compounds x 4 relations) with a probe for every
    # fact: a run infuses its first infusion.facts of them (nested levels, any number).
    "$PY" tools/make_knowledge.py --out $data/domain_world --general-entities 0 \
        --domain-entities 512 --seed 1
    mv $data/domain_world/domain $data/domain
    stamp "training the tokenizer"
    "$PY" tools/train_tokenizer.py --input $data/general/train.jsonl $data/domain/train.jsonl \
        --format jsonl --model-prefix $data/tok/tok --vocab-size 768
    stamp "tokenizing"
    for world in general domain; do
        "$PY" tools/preprocess_data.py --input $data/$world/train.jsonl --doc-key fact_id \
            --output-prefix $data/shards/$world --tokenizer-model $data/tok/tok.model --no-progress
    done
    touch $data/READY
fi
[ "${1:-}" = "--data-only" ] && exit 0

export OMP_NUM_THREADS=1
stamp "training the ladder (refined where each collapse is least known)"
"$PY" tools/sweep.py examples/tiny_ladder/sweep.yaml --jobs 2 --refine
stamp "fitting the law on the ladder"
"$PY" tools/extract_metrics.py $out/runs --out $out/table.csv
"$PY" tools/fit_law.py --table $out/table.csv --out $out/ladder_law --chance auto
stamp "validating on a larger held-out model (d192) around the predicted collapse point"
"$PY" tools/sweep.py examples/tiny_ladder/sweep.yaml --validate $out/ladder_law/law.json --jobs 2 --refine
stamp "checking the law against the held-out model"
"$PY" tools/fit_law.py --runs $out/runs --validation-runs $out/validate_runs --out $out/law \
    --chance auto --recommend 2e6,614400,0.3
stamp "done: $out/law/report.md"
