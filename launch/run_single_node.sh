#!/usr/bin/env bash
# One node, torchrun. Environment (defaults in brackets):
#   NPROC     processes [GPUs on this node, else 2]
#   CONFIG    run config [configs/demo_dense.yaml]
#   LOG_RANK  ranks whose output is shown [0]
#   PYTHON    interpreter with pma_dist installed [python3]
# Extra arguments go to launch/train.py (e.g. --full, --data DIR, --resume).
set -euo pipefail
cd "$(dirname "$0")/.."
GPUS=$(command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | wc -l || echo 0)
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || echo 2)}"
CONFIG="${CONFIG:-configs/demo_dense.yaml}"
LOG_RANK="${LOG_RANK:-0}"
PYTHON="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    --local-ranks-filter "$LOG_RANK" launch/train.py --config "$CONFIG" "$@"
