"""Running our code in other processes from a test: one environment, one free port."""

from __future__ import annotations

import os
import subprocess
import sys

from parallelism.launch import free_port
from tests.conftest import ROOT

__all__ = ["child_env", "free_port", "torchrun"]


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a child process: one thread per process (2-core CI runs several
    ranks side by side), warnings off (their text is not under test), plus `extra`."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **extra}


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port('127.0.0.1')}", *args]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                         env=child_env())
    if res.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res
