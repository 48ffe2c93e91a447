#!/usr/bin/env bash
# The second study of the tiny ladder: general-knowledge retention as the domain infusion
# ratio grows from 5% to 90% (4 sizes x 6 ratios, about 7 minutes on 2 cores), fitted on
# retention/general -> out/tiny_ladder/forgetting_law/. Needs the data of run.sh (it makes
# them first if they are missing). Not part of the main job: that one must stay under 10 min.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=out/tiny_ladder
if [ ! -f $out/data/READY ]; then
    echo "making the ladder's data first (examples/tiny_ladder/run.sh --data-only)"
    bash examples/tiny_ladder/run.sh --data-only
fi
OMP_NUM_THREADS=1 python tools/sweep.py examples/tiny_ladder/forgetting.yaml --jobs "${JOBS:-2}" --refine
python tools/extract_metrics.py $out/forgetting_runs --out $out/forgetting_table.csv
python tools/fit_law.py --table $out/forgetting_table.csv --out $out/forgetting_law \
    --metric retention/general --chance auto
echo "done: $out/forgetting_law/report.md"
