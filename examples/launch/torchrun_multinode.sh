#!/usr/bin/env bash
# One training run across several nodes, one process per GPU. Run the same command on every
# node, with NODE_RANK set to 0..NNODES-1:
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 bash examples/launch/torchrun_multinode.sh \
#       --config examples/gpu_ladder/base.yaml model.preset=1.3b log.dir=runs/big
#
# Add a layout as overrides: tensor parallel inside a node, pipeline across nodes, data
# parallel the rest (32 GPUs: tp=8 x pp=2 x dp=2), e.g. for the 7B preset
#
#   ... model.preset=7b parallel.tp=8 parallel.sp=true parallel.pp=2 parallel.zero1=true
#
# or feed it a line of `python tools/sweep.py SWEEP.yaml --print-launch torchrun` (drop the
# leading torchrun arguments). Rendezvous: c10d on MASTER_ADDR:MASTER_PORT; a rank that fails
# makes torchrun stop every rank (collectives time out after parallel.timeout_s seconds).
# Tested on one machine as two "nodes": tests/parallel/test_data_parallel.py.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
exec torchrun \
    --nnodes="$NNODES" --node-rank="$NODE_RANK" \
    --nproc-per-node="${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l || echo 1)}" \
    --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:${MASTER_PORT:-29500}" \
    --rdzv-id="${RDZV_ID:-kis-$MASTER_ADDR}" \
    -m kis_megatron.train "$@"
