#!/usr/bin/env bash
# Several nodes, torchrun with c10d rendezvous; run it on every node. FSDP2 runs as HSDP:
# parameters sharded within a node, replicated across nodes. Environment:
#   NNODES       nodes [2]           NODE_RANK    this node, 0..NNODES-1 [0]
#   MASTER_ADDR  rendezvous host [127.0.0.1]   MASTER_PORT  its port [29500]
#   NPROC        processes per node [GPUs, else 1]   CONFIG  run config [configs/demo_dense.yaml]
#   RDZV_ID      job id shared by all nodes [pma]    PYTHON  interpreter [python3]
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
NNODES="${NNODES:-2}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-29500}"
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 1)}"
CONFIG="${CONFIG:-configs/demo_dense.yaml}"
PYTHON="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" \
    --nproc-per-node "$NPROC" --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id "${RDZV_ID:-pma}" launch/train.py --config "$CONFIG" "$@"
