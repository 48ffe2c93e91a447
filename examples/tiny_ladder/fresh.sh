#!/usr/bin/env bash
# The fresh, pre-registered test of the law (examples/tiny_ladder/README.md, "Protocol of the
# fresh test", committed before any of its runs): two held-out targets the ladder's design never
# used, three seeds each, measured with the main job's detector and compared with the selected
# form's prediction. About 2.5 hours on 2 cores; it reuses the main job's and budgets.sh's runs
# (and makes them first when they are missing).
#   1. d256 (1.80M parameters, 3.4x the ladder's largest) at the main budget (300 steps),
#      predicted by the main job's ladder law (out/tiny_ladder/ladder_law/law.json);
#   2. d192 at 900 steps (1.84M tokens), predicted by the law fitted on the ladder at 300 and
#      600 steps (out/tiny_ladder/fresh_budget_law/law.json).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=out/tiny_ladder
start=$(date +%s)
stamp() { echo "[fresh $(( $(date +%s) - start ))s] $*"; }
[ -f $out/ladder_law/law.json ] || bash examples/tiny_ladder/run.sh
export OMP_NUM_THREADS=1
jobs="${JOBS:-2}"

stamp "1. d256 at 300 steps, 3 seeds, around the ladder law's prediction"
python tools/sweep.py examples/tiny_ladder/fresh_d256.yaml --validate $out/ladder_law/law.json --jobs $jobs --refine
python tools/fit_law.py --runs $out/runs --validation-runs $out/fresh_d256_runs --out $out/fresh_d256_law \
    --chance auto --recommend 1803520,614400,0.3

stamp "2. the ladder at 600 steps (budgets.yaml's runs), the law on both budgets"
python tools/sweep.py examples/tiny_ladder/fresh_budget.yaml --jobs $jobs --refine
python tools/fit_law.py --runs $out/runs $out/budget_runs --out $out/fresh_budget_law --chance auto --terms N,D
stamp "   d192 at 900 steps, 3 seeds, around that law's prediction"
python tools/sweep.py examples/tiny_ladder/fresh_budget.yaml --validate $out/fresh_budget_law/law.json \
    --jobs $jobs --refine
python tools/fit_law.py --runs $out/runs $out/budget_runs --validation-runs $out/fresh_budget_runs \
    --out $out/fresh_budget_law_checked --chance auto --terms N,D --recommend 1033152,1843200,0.3
stamp "done: $out/fresh_d256_law/report.md, $out/fresh_budget_law_checked/report.md"
