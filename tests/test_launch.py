"""Launch anywhere (torchrun, mpirun, SLURM's environment) and hang safety (a dead rank)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from parallelism.launch import discover, first_slurm_host
from tests.conftest import ROOT
from tests.distributed import child_env, free_port, torchrun

TRAIN = ["-m", "pretrain.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"),
         f"data.paths=[{ROOT / 'data/sample.txt'}]", "parallel.data=2", "train.micro_batch_size=8",
         "train.max_steps=6", "train.log_every=1", "optim.warmup_steps=0"]


def _losses(text: str) -> list[str]:
    return re.findall(r"\| loss (\S+) \|", text)


def test_discover_reads_each_launcher(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID",
                "SLURM_STEP_RESV_PORTS",
                "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert discover().source == "single"
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[7-8]")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: parse the list ourselves
    got = discover()
    assert (got.source, got.rank, got.world, got.local_rank, got.master_addr, got.master_port) \
        == ("slurm", 3, 4, 1, "gpu7", 10000 + 12345 % 20000)
    monkeypatch.setenv("SLURM_STEP_RESV_PORTS", "12071-12086")  # reserved for this step
    assert discover().master_port == 12071
    monkeypatch.setenv("PMI_RANK", "0")  # mpirun inside an allocation: SLURM_PROCID is stale
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert discover().source == "torchrun" and discover().rank == 2
    assert first_slurm_host("node001,node002") == "node001"


@pytest.mark.multiproc
def test_torchrun_and_mpirun_give_identical_losses(tmp_path):
    a = torchrun(2, *TRAIN, f"train.out_dir={tmp_path / 'torchrun'}").stdout
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = child_env()
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    res = subprocess.run([mpiexec, "-n", "2", sys.executable, *TRAIN,
                          f"train.out_dir={tmp_path / 'mpi'}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(_losses(a)) == 6
    assert _losses(a) == _losses(res.stdout)


@pytest.mark.multiproc
@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_rank_makes_the_others_exit_within_60s(tmp_path, victim):
    port = free_port()
    procs = []
    for rank in range(2):
        env = child_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(
            [sys.executable, *TRAIN, "train.max_steps=100000", "parallel.peer_timeout_s=10",
             f"train.out_dir={tmp_path / str(rank)}"], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        for line in procs[0].stdout:  # wait until training is under way
            if line.startswith("step"):
                break
        time.sleep(0.5)
        procs[victim].send_signal(signal.SIGKILL)
        survivor = procs[1 - victim]
        start = time.monotonic()
        rc = survivor.wait(timeout=90)
        elapsed = time.monotonic() - start
        err = survivor.stderr.read()
    finally:
        for p in procs:
            p.kill()
    assert rc != 0 and elapsed < 60, (rc, elapsed, err[-2000:])
    if victim == 1:
        assert rc == 4 and "pretrain: error: rank 1 stopped responding" in err, err[-2000:]
    else:
        assert "pretrain: error: lost the rendezvous store" in err or \
            "rank 0 stopped responding" in err, err[-2000:]
