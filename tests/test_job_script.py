"""slurm/job.sbatch's requeue decision, run by bash against stand-in `srun` and `scontrol`:
a preempted step requeues the job whether srun reports 75 (every rank exited so) or 143 (it
terminated the ranks still exiting when the first left, --kill-on-bad-exit) -- rank 0's mark
decides then; a crash does not requeue, and a mark left by an earlier run does not count."""

from __future__ import annotations

import os
import subprocess

import pytest

from core.exit_codes import PREEMPTED_MARKER
from slurm.submit import JobSpec, render


def _run_job(tmp_path, srun_body: str, stale_mark: bool = False) -> str:
    bin_dir, run_dir = tmp_path / "bin", tmp_path / "run"
    bin_dir.mkdir()
    run_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/bash\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol.log\n")
    for f in ("srun", "scontrol"):
        (bin_dir / f).chmod(0o755)
    if stale_mark:
        (run_dir / PREEMPTED_MARKER).write_text("an earlier run\n")
    script = tmp_path / "job.sbatch"
    script.write_text(render(JobSpec(), "t", run_dir, "train"))
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42",
           "SLURM_JOB_NODELIST": "n1"}
    subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    log = tmp_path / "scontrol.log"
    return log.read_text() if log.exists() else ""


@pytest.mark.parametrize("srun_body,requeued", [
    ("exit 75", True),  # every rank exited 75
    (f"touch {PREEMPTED_MARKER}; exit 143", True),  # rank 0 marked, the others terminated
    ("exit 1", False),  # a crash
    ("exit 0", False),  # finished
])
def test_the_job_requeues_exactly_when_preempted(tmp_path, srun_body, requeued):
    assert (_run_job(tmp_path, srun_body) == "requeue 42\n") is requeued


def test_a_mark_left_by_an_earlier_run_does_not_requeue_a_crash(tmp_path):
    assert _run_job(tmp_path, "exit 1", stale_mark=True) == ""
