#!/usr/bin/env bash
# Run launch/quickstart.py on one node with torchrun.
#   NPROC   processes (default 2; GPUs per node on a GPU machine)
#   PYTHON  interpreter with pma_dist installed (default: python3)
set -euo pipefail
cd "$(dirname "$0")/.."
NPROC="${NPROC:-2}"
PYTHON="${PYTHON:-python3}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" launch/quickstart.py "$@"
