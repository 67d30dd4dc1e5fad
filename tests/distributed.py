"""Launch a module under torchrun from a test (gloo on CPU) and return its result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    if res.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({res.returncode}):\n"
                             f"{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res
