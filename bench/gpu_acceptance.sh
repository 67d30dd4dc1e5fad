#!/usr/bin/env bash
# The GPU lease's one command (issue 26): no network, about 15 minutes of device time, so
#   1. whatever Python packages are missing come from a carried wheelhouse (`make wheelhouse`;
#      WHEELHOUSE=dir, default ./wheelhouse), never from an index;
#   2. bench/gpu_acceptance.py runs under a 9-minute limit: doctor, the CUDA tier, throughput
#      beside the planner, decoding per KV policy; results to $OUT (default .) as JSON + table.
#   bash bench/gpu_acceptance.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
house=${WHEELHOUSE:-wheelhouse}
py=${PYTHON:-python3}
if ! "$py" -c 'import pretrain, megatron.core, deepspeed, webdataset' 2>/dev/null; then
    [ -d "$house" ] || { echo "gpu_acceptance: packages missing and no wheelhouse at $house" >&2; exit 2; }
    PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q --no-index --find-links "$house" -e .
fi
timeout 540 "$py" bench/gpu_acceptance.py --out "$out/gpu_acceptance.json" "$@" \
    | tee "$out/gpu_acceptance.txt"
