"""Re-run a benchmark module under torchrun (gloo, one thread per process). Benchmarks run as
modules from the repository root (`python -m bench.NAME`): the package is installed, nothing
edits sys.path."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_self(module: str, nproc: int, port: int, capture: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port}", "-m", module]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if capture:
        return subprocess.run(cmd, capture_output=True, text=True, env=env)
    return subprocess.call(cmd, env=env)
