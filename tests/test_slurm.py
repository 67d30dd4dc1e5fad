"""On a real single-node SLURM cluster (slurm/local_cluster.sh starts it): submission, the
preemption -> checkpoint -> requeue -> resume cycle, and hostile values in the script."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import pytest

from pretrain.run.status import losses_by_step
from slurm.submit import job_state
from tests.conftest import ROOT
from tests.distributed import torchrun

pytestmark = pytest.mark.slurm

DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}
RUN = ["configs/tiny.yaml", "train.log_every=10", "parallel.data=2", "train.micro_batch_size=8"]


@pytest.fixture(scope="module")
def cluster():
    state = Path(os.environ.get("LOCAL_SLURM_DIR", Path(tempfile.gettempdir())  # a rerun
                                / f"looped-pretrain-slurm-{os.getuid()}"))
    script = ROOT / "slurm/local_cluster.sh"  # stops what an interrupted one left there
    res = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, f"local SLURM cluster did not start:\n{res.stdout}\n{res.stderr}"
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    yield state
    subprocess.run(["bash", str(script), "stop", str(state)], timeout=60)
    if old is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = old


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def _submit(out: Path, *extra: str, name: str = "") -> str:
    res = _cli("submit", "--config", *RUN, f"train.out_dir={out}", *extra, "--time", "00:10:00",
               *(["--name", name] if name else []))
    assert res.returncode == 0, res.stderr
    return re.search(r"submitted job (\d+)", res.stdout).group(1)


def _wait(job: str, timeout: float = 300) -> str:
    deadline = time.time() + timeout
    while (state := job_state(job)) not in DONE:
        assert time.time() < deadline, f"job {job} still {state}"
        time.sleep(1)
    return state


def _wait_array(job: str, timeout: float = 300) -> dict[str, str]:
    """Task id -> state of a job array once none of its tasks is waiting or running (a task
    cancelled while pending is not listed)."""
    deadline = time.time() + timeout
    while subprocess.run(["squeue", "-h", "-j", job, "-t", "PD,R,CF,CG"], capture_output=True,
                         text=True).stdout.strip():
        assert time.time() < deadline, f"job array {job} still running"
        time.sleep(1)
    states = subprocess.run(["squeue", "-h", "-t", "all", "-j", job, "-o", "%i %T"],
                            capture_output=True, text=True).stdout.split("\n")
    return dict(line.split() for line in states if line.strip())


def test_submit_runs_a_two_task_job_to_completion(cluster, tmp_path):
    out = tmp_path / "run"
    job = _submit(out, "train.max_steps=20")
    assert _wait(job) == "COMPLETED", (out / f"slurm-{job}.out").read_text()
    assert max(losses_by_step(out)) == 20
    assert (out / "checkpoints/step_0000020/meta.json").is_file()
    status = _cli("status", str(out))
    assert f"slurm job: {job} COMPLETED" in status.stdout
    assert "last checkpoint: " in status.stdout and "(step 20)" in status.stdout


def test_preemption_checkpoints_requeues_and_finishes_like_an_uninterrupted_run(cluster, tmp_path):
    steps = ["train.max_steps=300", "train.checkpoint_every=100"]
    ref = tmp_path / "ref"
    torchrun(2, "-m", "pretrain.cli", "train", "--config", *RUN, *steps, f"train.out_dir={ref}")
    out = tmp_path / "run"
    job = _submit(out, *steps)
    deadline = time.time() + 120
    while max(losses_by_step(out), default=0) < 40:
        assert time.time() < deadline and job_state(job) not in DONE
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    assert _wait(job) == "COMPLETED"
    log = (out / f"slurm-{job}.out").read_text()
    # srun's step code is 75, or 143 when it terminated the ranks still exiting after the
    # first: the job requeues either way (rank 0's .preempted mark)
    assert re.search(r"step exited (75|143) ", log) and "preempted: requeueing" in log
    assert "restart 1" in log and "resumed from" in log
    show = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in show
    assert losses_by_step(out) == losses_by_step(ref)  # every logged loss, bit-identical


def test_hostile_values_stay_literal(cluster, tmp_path):
    canary = tmp_path / "pwned"
    hostile = f"run dir 'q' \"d\" $(touch {canary}) `touch {canary}` ;x"
    out = tmp_path / hostile
    res = _cli("submit", "--config", *RUN, f"train.out_dir={out}", "--dry-run",
               "--name", f"n $(touch {canary})")
    script = res.stdout
    assert script.startswith("#!/bin/bash\n")  # stdout is the script; how it is submitted:
    assert res.stderr.strip() == (f"(submitted as: sbatch --parsable "
                                  f"{shlex.quote(f'--output={out}/slurm-%j.out')} "
                                  f"{shlex.quote(f'--chdir={out}')} "
                                  f"{shlex.quote(str(out / 'submit.sbatch'))})")
    name = re.search(r"^#SBATCH --job-name=(.*)$", script, re.M).group(1)
    assert name.startswith("n___touch_") and re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", name)
    assert f"cd {shlex.quote(str(out))}\n" in script
    assert shlex.quote(str(out / "submit.yaml")) in script
    job = _submit(out, "train.max_steps=5", "optim.warmup_steps=1", "parallel.data=1",
                  name=f"n $(touch {canary})")
    assert _wait(job) == "COMPLETED", list(tmp_path.iterdir())
    assert (out / "checkpoints/step_0000005/meta.json").is_file()
    assert not canary.exists()


def test_a_sweep_runs_as_a_job_array_then_collects_and_fits(cluster, tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {ROOT / 'configs/tiny.yaml'}\nout_dir: {tmp_path / 'sweep'}\n"
                    f"overrides: [train.max_steps=12, train.log_every=6, optim.warmup_steps=2]\n"
                    "list: [{model.loops: 1}, {model.loops: 2}, {model.loops: 3}]\n"
                    "eval_batches: 2\nslurm: {time: '00:10:00', concurrent: 2}\n")
    res = _cli("sweep", "--spec", str(spec), "--submit")
    assert res.returncode == 0, res.stderr
    job = re.search(r"submitted job array (\d+)", res.stdout).group(1)
    script = (tmp_path / "sweep/sweep.sbatch").read_text()
    assert "#SBATCH --array=0-2%2" in script
    tasks = _wait_array(job)
    assert len(tasks) == 3 and set(tasks.values()) == {"COMPLETED"}, tasks
    assert _cli("sweep", "collect", str(tmp_path / "sweep")).returncode == 0
    fit = _cli("sweep", "fit", str(tmp_path / "sweep"))
    assert fit.returncode == 0, fit.stderr
    rows = (tmp_path / "sweep/results.csv").read_text().splitlines()
    assert len(rows) == 4  # header + 3 points
    # R in {1, 2, 3} at one size and budget: the loop-count law, and no L(N, D) law
    assert "L(R) = " in fit.stdout and fit.stdout.startswith("no L(N, D) law: ")
    assert (tmp_path / "sweep/loops.png").is_file()
    assert not (tmp_path / "sweep/fit_vs_points.png").exists()


def test_tokenisation_array_merges_to_one_process_and_resubmits_only_what_is_missing(
        cluster, tmp_path):
    """A 4-task array over CPython's standard library modules (~5 MB here; the bench runs
    ~50 MB: bench/data_throughput.py --array): its merged manifest and tokens equal one
    process's; a killed task is resubmitted with the same command and the finished parts are
    not redone."""
    from data_pipeline.shards import Manifest
    from data_pipeline.stream import ShardSource

    std = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(std / "*.py"), str(std / "json/**/*.py")]
    tok = tmp_path / "tok.json"
    res = _cli("data", "train-tokenizer", "--input", *inputs, "--sample-bytes", "1000000",
               "--vocab-size", "1024", "--output", str(tok), "--on-error", "skip")
    assert res.returncode == 0, res.stderr
    common = ["--input", *inputs, "--tokenizer", str(tok), "--on-error", "skip",
              "--shard-tokens", str(1 << 19), "--chunk-tokens", "4096"]
    assert _cli("data", "tokenize", *common, "--output", str(tmp_path / "one")).returncode == 0
    job = tmp_path / "job"
    submit = ["data", "tokenize", *common, "--output", str(job), "--tasks", "4", "--submit",
              "--time", "00:10:00"]
    res = _cli(*submit)
    assert res.returncode == 0, res.stderr
    array, merge = re.search(r"job array (\d+) .* merge job (\d+)", res.stdout).groups()
    subprocess.run(["scancel", f"{array}_2"], check=True)  # killed before it could finish
    tasks = _wait_array(array)
    assert tasks.get(f"{array}_2", "CANCELLED") == "CANCELLED"
    assert [tasks[f"{array}_{k}"] for k in (0, 1, 3)] == ["COMPLETED"] * 3, tasks
    subprocess.run(["scancel", merge], check=True)  # its dependency can no longer be met
    said = _cli("status", str(job)).stdout
    assert "3 of 4 parts done" in said and "not done: parts 2" in said
    done = {k: (job / f"parts/part-{k:05d}/part.json").stat().st_mtime_ns for k in (0, 1, 3)}
    res = _cli(*submit)  # the same command again
    assert res.returncode == 0, res.stderr
    array, merge = re.search(r"job array (\d+) .* merge job (\d+)", res.stdout).groups()
    assert _wait(merge) == "COMPLETED", (job / "parts").exists()
    assert Manifest.load(job) == Manifest.load(tmp_path / "one")
    m = Manifest.load(job)
    assert m.skipped.get("documents", 0) > 0 or m.documents > 100  # real files, counted skips
    read = [ShardSource(str(d), 0, 0, 0, False, 1 << 20, None)._read(0, 0, m.total_tokens)
            for d in (job, tmp_path / "one")]
    assert (read[0] == read[1]).all()
    for k in range(4):  # the second array: three parts found done, one tokenised
        log = (job / f"parts/slurm-{array}_{k}.out").read_text()
        assert ("done already" in log) == (k != 2), log
    assert done == {k: (job / f"parts/part-{k:05d}/part.json").stat().st_mtime_ns for k in done}
    assert "merged" in _cli("status", str(job)).stdout
