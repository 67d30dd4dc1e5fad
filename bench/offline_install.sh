#!/usr/bin/env bash
# An air-gapped install, rehearsed here: `make wheelhouse`, then a fresh venv that holds only a
# torch (as a cluster node or NGC container would) installs the project from the wheelhouse
# with no index at all (PIP_CONFIG_FILE=/dev/null, --no-index), and runs `pretrain doctor` and
# a 2-step training run in it. Prints the wheelhouse size and the seconds each stage took.
#   bash bench/offline_install.sh [WORKDIR]     (default: a new private temp directory)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
house="$work/wheelhouse"
t0=$SECONDS
[ -d "$house" ] || make -s wheelhouse WHEELHOUSE="$house"  # (a rerun reuses it)
t1=$SECONDS
torch_dir="$work/torch"  # the node's own torch, which the wheelhouse leaves out
.venv/bin/python -m pip download -q --no-deps "torch==$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" -d "$torch_dir"
python3 -m venv "$work/venv"
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1
"$work/venv/bin/pip" install -q --no-index --find-links "$torch_dir" --find-links "$house" torch
t2=$SECONDS
"$work/venv/bin/pip" install -q --no-index --find-links "$house" -e '.[dev]'
t3=$SECONDS
"$work/venv/bin/pretrain" doctor
out="$work/run"
"$work/venv/bin/pretrain" train --config configs/tiny.yaml "train.out_dir=$out" train.max_steps=2 \
    optim.warmup_steps=0 train.log_every=1 | tail -2
echo "wheelhouse: $(ls "$house" | grep -c '\.whl$') wheels, $(du -sh "$house" | cut -f1); make wheelhouse $((t1 - t0)) s, offline install $((t3 - t2)) s (torch beside it: $((t2 - t1)) s)"
