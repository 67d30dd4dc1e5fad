#!/usr/bin/env bash
# The fast tier on the oldest torch of the supported range (pretrain/planning/doctor.py TORCH_RANGE), as
# CI's second pass: a venv holding only that torch (PyPI's x86_64 build is CUDA's, ~5 GB with its
# libraries; it runs on the CPU), which reaches every other package through .venv's
# site-packages (`make install` first).   bash .ci/oldest_torch.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${OLDEST_TORCH:-2.9.1}
venv=.venv-torch$version
purelib() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install -q "torch==$version"
echo "import site; site.addsitedir('$(purelib .venv/bin/python)')" > "$(purelib "$venv/bin/python")/zz_project_venv.pth"
"$venv/bin/python" -c "import torch; assert torch.__version__.startswith('$version'), torch.__version__"
exec "$venv/bin/python" -m pytest -q -rs -p no:cacheprovider \
    -m "not multiproc and not slurm and not slow and not fuzz" "$@"
