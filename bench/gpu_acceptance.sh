#!/usr/bin/env bash
# The GPU lease's one command: no network, 15 minutes of device time in all, so
#   1. only the packages the image lacks are installed, each with --no-deps from a carried
#      folder of wheels for the image's Python (WHEELHOUSE, default ./wheelhouse; built by
#      `make wheelhouse PYTHON=3.12 ONLY="megatron-core webdataset braceexpand zstandard"`,
#      a few MB); torch and everything already there are left alone, no index is asked;
#   2. the project runs from this checkout (PYTHONPATH), not installed;
#   3. bench/gpu_acceptance.py runs under an 8-minute limit, each part under its own budget:
#      doctor, the whole CUDA tier, throughput beside the planner, decoding per KV policy;
#      results to $OUT (default .) as JSON (rewritten after every part) + table.
#   bash bench/gpu_acceptance.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.}
house=${WHEELHOUSE:-wheelhouse}
py=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$house" ]; then
    # a wheel whose distribution is not installed yet (name before the first '-', PEP 427)
    missing=$("$py" - "$house" <<'PY'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    if name.lower() in ("torch", "triton") or name.lower().startswith("nvidia"):
        continue
    try:
        version(name)
    except PackageNotFoundError:
        print(wheel)
PY
)
    if [ -n "$missing" ]; then
        echo "installing what the image lacks: $(echo $missing | xargs -n1 basename | tr '\n' ' ')"
        # shellcheck disable=SC2086
        PIP_CONFIG_FILE=/dev/null "$py" -m pip install -q --no-deps --no-index $missing
    fi
fi
timeout 480 "$py" -m bench.gpu_acceptance --out "$out/gpu_acceptance.json" "$@" \
    | tee "$out/gpu_acceptance.txt"
