#!/usr/bin/env bash
# The tiny ladder at a second token budget: the law CP = a N^b D^c with its budget exponent,
# checked on a larger held-out model at the new budget (about 20 minutes on 2 cores). Needs
# the main job's runs (run.sh) for the first budget; makes them first if they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=out/tiny_ladder
start=$(date +%s)
stamp() { echo "[budgets $(( $(date +%s) - start ))s] $*"; }
if [ ! -f $out/law/law.json ]; then
    echo "running the main job first (examples/tiny_ladder/run.sh)"
    bash examples/tiny_ladder/run.sh
fi
export OMP_NUM_THREADS=1
stamp "training the ladder at 600 steps (refined)"
python tools/sweep.py examples/tiny_ladder/budgets.yaml --jobs "${JOBS:-2}" --refine
stamp "fitting CP = a N^b D^c on both budgets"
python tools/fit_law.py --runs $out/runs $out/budget_runs --out $out/budget_law --chance auto \
    --terms N,D
stamp "validating on d192 at 600 steps"
python tools/sweep.py examples/tiny_ladder/budgets.yaml --validate $out/budget_law/law.json \
    --jobs "${JOBS:-2}" --refine
python tools/fit_law.py --runs $out/runs $out/budget_runs --validation-runs $out/budget_validate_runs \
    --out $out/budget_law_checked --chance auto --terms N,D
stamp "done: $out/budget_law_checked/report.md"
