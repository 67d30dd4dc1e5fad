"""Render the sbatch script of a run and submit it.

Every value that reaches the script body is shell-quoted (`shlex.quote`); values that must sit
in `#SBATCH` lines (which sbatch parses itself, without a shell) are either validated against
SLURM's own name rules or sanitised (the job name), and paths go to `sbatch` as separate argv
entries, never through a shell -- so a run name like `a b'"$(rm -rf ~)` stays literal.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from core.config_schema import ConfigError
from core.exit_codes import EXIT_PREEMPTED, PREEMPTED_MARKER

TEMPLATE = Path(__file__).with_name("job.sbatch")
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass
class JobSpec:
    """What SLURM is asked for; the layout (tasks) comes from the run config."""

    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    time: str = "01:00:00"
    partition: str = ""
    account: str = ""
    grace_s: int = 120  # USR1 this long before the time limit: time to save a checkpoint
    array: str = ""  # job array, e.g. "0-2%2" (sweeps)

    def check(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.gpus_per_node < 0 or self.grace_s < 1:
            raise ConfigError("--gpus-per-node / grace: must be >= 0 / >= 1")
        if not _TIME.match(self.time):
            raise ConfigError(f"--time: {self.time!r} is not a SLURM time (e.g. 04:00:00, 2-00:00:00)")
        for name in ("partition", "account"):
            value = getattr(self, name)
            if value and not _NAME.match(value):
                raise ConfigError(f"--{name}: {value!r} is not a valid SLURM {name} name")
        if self.array and not re.match(r"^\d+(-\d+)?(%\d+)?$", self.array):
            raise ConfigError(f"array: {self.array!r} is not a SLURM array range")


def job_name(text: str) -> str:
    """A job name sbatch will not misparse: unsafe characters become '_'."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)[:64] or "pretrain"


def train_command(config: Path, overrides: list[str], python: str = sys.executable) -> str:
    """The quoted `python -m pretrain.cli train ...` every task runs (resuming automatically)."""
    args = [python, "-m", "pretrain.cli", "train", "--config", str(config), "--resume", "auto",
            *overrides]
    return " ".join(shlex.quote(a) for a in args)


def render(spec: JobSpec, name: str, run_dir: Path, command: str) -> str:
    """The batch script. `command` must already be quoted (see train_command)."""
    spec.check()
    extra = [f"#SBATCH --partition={spec.partition}" if spec.partition else "",
             f"#SBATCH --account={spec.account}" if spec.account else "",
             f"#SBATCH --gpus-per-node={spec.gpus_per_node}" if spec.gpus_per_node else "",
             f"#SBATCH --array={spec.array}" if spec.array else ""]
    return TEMPLATE.read_text().format(
        job_name=job_name(name), nodes=spec.nodes, tasks_per_node=spec.tasks_per_node,
        cpus_per_task=spec.cpus_per_task, time=spec.time, grace=spec.grace_s,
        extra_directives="\n".join(e for e in extra if e), run_dir=shlex.quote(str(run_dir)),
        gpu_env="" if spec.gpus_per_node else " CUDA_VISIBLE_DEVICES=",
        command=command, exit_preempted=EXIT_PREEMPTED,
        preempted_marker=PREEMPTED_MARKER)


def sbatch_command(script: Path, run_dir: Path, array: bool = False, after: str = "") -> list[str]:
    """The sbatch call: logs next to the script (one file per job, appended across requeues),
    run in `run_dir`; `after`: a job id this one waits for (it runs only if that succeeded)."""
    log = run_dir / ("slurm-%A_%a.out" if array else "slurm-%j.out")
    if after and not after.isdigit():
        raise ConfigError(f"sbatch {script}: job id {after!r} is not a number")
    return ["sbatch", "--parsable", f"--output={log}", f"--chdir={run_dir}",
            *([f"--dependency=afterok:{after}"] if after else []), str(script)]


def sbatch(script: Path, run_dir: Path, array: bool = False, after: str = "") -> str:
    """Submit (`sbatch_command`); returns the job id."""
    res = subprocess.run(sbatch_command(script, run_dir, array, after), capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise ConfigError(f"sbatch {script}: {res.stderr.strip() or res.stdout.strip()}")
    job = res.stdout.strip().split(";")[0]
    (run_dir / "slurm_job_id").write_text(job + "\n")
    return job


def job_state(job: str) -> str | None:
    """SLURM's state of a job (PENDING, RUNNING, COMPLETED, ...), or None if unknown."""
    res = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    m = re.search(r"JobState=(\S+)", res.stdout)
    return m.group(1) if m else None
