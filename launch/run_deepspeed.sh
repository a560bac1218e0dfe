#!/usr/bin/env bash
# The DeepSpeed launcher with a hostfile (lines "host slots=N"); PMA comes from the config's
# pma section through pma_dist.deepspeed.initialize. Environment:
#   HOSTFILE  [launch/hostfile.example]   CONFIG  [configs/demo_deepspeed.yaml]
#   NPROC     processes per node when there is no hostfile [2]
set -euo pipefail
cd "$(dirname "$0")/.."
HOSTFILE="${HOSTFILE:-launch/hostfile.example}"
CONFIG="${CONFIG:-configs/demo_deepspeed.yaml}"
if [ -f "$HOSTFILE" ] && grep -qv '^localhost' "$HOSTFILE"; then
    exec deepspeed --hostfile "$HOSTFILE" launch/train.py --config "$CONFIG" "$@"
fi
exec deepspeed --num_gpus "${NPROC:-2}" launch/train.py --config "$CONFIG" "$@"
