#!/usr/bin/env bash
# The accelerator path, checked on one CUDA GPU in about 4-5 minutes, from this tree as it is
# (PYTHONPATH=.; nothing is installed, torch is left alone). Each part runs under its own
# timeout and writes OUT/<part>.json as soon as it ends, so a partial run still says what it
# found; the summary table comes last.
#
#   tools/gpu_check.sh                       # every part
#   PARTS=tests,snapshot tools/gpu_check.sh  # only these (rerun what failed)
#
# Environment: PARTS [tests,snapshot,compressed,overhead,demo], OUT [$OUT, else gpu_check_out],
# PYTHON [python3]. Parts: tests (tests/test_gpu.py, host syncs raising inside snapshots and
# running folds), snapshot (benchmarks.snapshot_bandwidth --device cuda, with the offload rows),
# compressed (the compressed window's encode and merge on the device), overhead (a 1.1B Llama
# in bf16 under FSDP2, steps with and without PMA, offload none and cpu), demo (the main job on
# one GPU). Without CUDA it refuses at once.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-gpu_check_out}"
PARTS="${PARTS:-tests,snapshot,compressed,overhead,demo}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false); nothing checked"
    exit 2
fi
mkdir -p "$OUT"
WORK="$(mktemp -d)"
"$PYTHON" tools/gpu_check.py versions "$OUT" >/dev/null

have() { "$PYTHON" -c "import $1" 2>/dev/null; }

run_part() {  # run_part NAME LIMIT_S RESULT_FILE COMMAND...
    local name=$1 limit=$2 result=$3
    shift 3
    echo "== $name (at most ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    "$PYTHON" tools/gpu_check.py record "$OUT" "$name" "$rc" "$((SECONDS - start))" "$result"
}

skip_part() {  # skip_part NAME REASON
    echo "== $1: skipped, $2"
    "$PYTHON" tools/gpu_check.py record "$OUT" "$1" 75 0
}

for part in ${PARTS//,/ }; do
    case $part in
    tests)
        run_part tests 120 "$WORK/tests.xml" "$PYTHON" -m pytest -q -p no:cacheprovider \
            tests/test_gpu.py --junitxml="$WORK/tests.xml" ;;
    snapshot)
        run_part snapshot 75 "$WORK/snapshot.json" "$PYTHON" -m benchmarks.snapshot_bandwidth \
            --device cuda --sizes 100,400 --repeats 11 --out "$WORK/snapshot.json" ;;
    compressed)
        run_part compressed 45 "$WORK/compressed.json" "$PYTHON" -m benchmarks.compressed_window \
            --device cuda --speed-only --params-millions 400 --repeats 11 \
            --out "$WORK/compressed.json" ;;
    overhead)
        if have transformers; then
            run_part overhead 140 "$WORK/overhead.json" "$PYTHON" -m benchmarks.training_overhead \
                --model llama-1b --nproc 1 --steps 40 --interval 50 --offload none,cpu \
                --out "$WORK/overhead.json"
        else skip_part overhead "transformers is not installed"; fi ;;
    demo)
        if have transformers; then
            run_part demo 180 "$WORK/demo/report.json" env PYTHON="$PYTHON" NPROC=1 \
                bash launch/run_single_node.sh --run-dir "$WORK/demo"
        else skip_part demo "transformers is not installed"; fi ;;
    *)
        echo "gpu_check: unknown part '$part' (tests, snapshot, compressed, overhead, demo)" ;;
    esac
done
"$PYTHON" tools/gpu_check.py summary "$OUT"
rm -rf "$WORK"
