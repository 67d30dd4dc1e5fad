"""Re-run a benchmark script under torchrun (gloo, one thread per process)."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_self(script: str, nproc: int, port: int, capture: bool = False):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={port}", script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if capture:
        return subprocess.run(cmd, capture_output=True, text=True, env=env)
    return subprocess.call(cmd, env=env)
