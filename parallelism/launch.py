"""Rank discovery: the same `pretrain train` under torchrun, srun or mpirun.

In order of explicitness:
  torchrun  RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT are already set;
  srun      SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the master is the first host of
            SLURM_JOB_NODELIST (`scontrol show hostnames`), the port MASTER_PORT, else the
            first of the step's reserved ports (SLURM_STEP_RESV_PORTS, where the cluster sets
            MpiParams=ports=...: no other job holds it), else one derived from the job id (so
            every task of a job agrees without talking);
  mpirun    MPI via mpi4py (as DeepSpeed's MPI discovery does): COMM_WORLD rank and size, the
            node-local rank from a shared-memory split, rank 0's host and a free port of it
            broadcast to all.
The result is exported as torchrun's variables, so `init_process_group("env://")` works alike.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


@dataclass(frozen=True)
class Launch:
    source: str  # "torchrun", "slurm", "mpi" or "single"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def free_port(host: str = "") -> int:
    """A TCP port free on `host` now (the OS picks it: not predictable, not in use)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """First hostname of a SLURM node list ('node[3-5,9]' -> 'node3')."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def _mpi_rank_env() -> str | None:
    return next((os.environ[v] for v in MPI_RANK_VARS if v in os.environ), None)


def _slurm_port(env) -> int:
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    reserved = env.get("SLURM_STEP_RESV_PORTS", "")  # "12000-12015" or "12000,12003"
    if reserved:
        return int(reserved.replace(",", "-").split("-")[0])
    return 10000 + int(env.get("SLURM_JOB_ID", 0)) % 20000


def discover() -> Launch:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return Launch("torchrun", int(env["RANK"]), int(env["WORLD_SIZE"]),
                      int(env.get("LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                      int(env.get("MASTER_PORT", 29500)))
    mpi_rank = _mpi_rank_env()
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and mpi_rank in (None, env["SLURM_PROCID"]):
        port = _slurm_port(env)
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", "localhost"))
        return Launch("slurm", int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                      int(env.get("SLURM_LOCALID", 0)), addr, port)
    if mpi_rank is not None:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        addr, port = comm.bcast((socket.gethostname(), free_port()) if comm.Get_rank() == 0
                                else None, root=0)
        return Launch("mpi", comm.Get_rank(), comm.Get_size(), local,
                      env.get("MASTER_ADDR", addr), int(env.get("MASTER_PORT", port)))
    return Launch("single")


def export(launch: Launch) -> None:
    """Set torchrun's variables for env:// initialisation."""
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(launch.master_port))
