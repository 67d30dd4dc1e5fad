"""Run a sweep's points here, one after another, or submit them as one SLURM job array."""

from __future__ import annotations

import os
import reprlib
import shlex
import subprocess
import sys
import time
from pathlib import Path

from core.config_schema import build, is_kind
from pretrain.config import ConfigError
from pretrain.sweep.spec import Point, SweepSpec


def _shown(path: Path) -> str:
    """`path` relative to the working directory where it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def run_local(points: list[Point], log=print) -> None:
    """Each point in turn (torchrun when its layout has several processes); a point that
    already finished is skipped, an interrupted one resumes. Says [k/N], each point's settings,
    log file, final loss and time, and the time left at the mean pace so far."""
    from pretrain.run.status import last_metrics

    start = time.monotonic()
    for k, pt in enumerate(points, start=1):
        world = pt.cfg.parallel.world_size
        prefix = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
                  if world > 1 else [sys.executable])
        cmd = [*prefix, "-m", "pretrain.cli", "train", "--config", str(pt.run_dir / "config.yaml"),
               "--resume", "auto"]
        settings = ", ".join(f"{key}={value}" for key, value in pt.settings.items()) or "the base"
        log(f"sweep: [{k}/{len(points)}] point {pt.index}: {settings} "
            f"(log: {_shown(pt.run_dir / 'train.log')})")
        began = time.monotonic()
        with open(pt.run_dir / "train.log", "a") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if rc != 0:
            raise ConfigError(f"sweep point {pt.index}: training failed (exit {rc}); "
                              f"see {pt.run_dir / 'train.log'}")
        loss = (last_metrics(pt.run_dir) or {}).get("train/loss")
        now = time.monotonic()
        left = (now - start) / k * (len(points) - k)
        log(f"sweep: [{k}/{len(points)}] point {pt.index} done in {now - began:.0f} s"
            + (f", train loss {loss:.4f}" if isinstance(loss, float) else "")
            + (f"; about {left / 60:.1f} min left" if k < len(points) else ""))


def submit_array(spec: SweepSpec, points: list[Point]) -> str:
    """One job array over the points (`--array=0-K%C`); task i trains point i."""
    from slurm.submit import JobSpec, render, sbatch

    s = dict(spec.slurm)
    if isinstance(s.get("time"), int):  # YAML 1.1 reads an unquoted 4:00:00 as base-60 seconds
        raise ConfigError(f"{spec.path}: slurm.time: {s['time']} is a number (YAML reads an "
                          "unquoted 4:00:00 as seconds); quote it: time: \"04:00:00\"")
    concurrent = s.pop("concurrent", 0)
    if not is_kind(concurrent, int) or concurrent < 0:
        raise ConfigError(f"{spec.path}: slurm.concurrent: expected an integer >= 0, got "
                          f"{reprlib.repr(concurrent)}")
    for key in ("array", "tasks_per_node"):
        if key in s:
            raise ConfigError(f"{spec.path}: slurm.{key}: set by the sweep (one task per point, "
                              "parallel.* processes each)")
    job = build(JobSpec, s, f"{spec.path}: slurm")
    world = points[0].cfg.parallel.world_size
    if job.nodes < 1 or world % job.nodes:
        raise ConfigError(f"{spec.path}: slurm.nodes: {job.nodes} does not divide the "
                          f"{world} processes of a point")
    job.tasks_per_node = world // job.nodes
    job.array = f"0-{len(points) - 1}" + (f"%{concurrent}" if concurrent else "")
    points_dir = shlex.quote(str(spec.out_dir / "points"))
    command = (f"{shlex.quote(sys.executable)} -m pretrain.cli train --config "
               f"{points_dir}/\"${{SLURM_ARRAY_TASK_ID}}\"/config.yaml --resume auto")
    script = render(job, f"sweep-{spec.out_dir.name}", spec.out_dir, command)
    path = spec.out_dir / "sweep.sbatch"
    path.write_text(script)
    return sbatch(path, spec.out_dir, array=True)


def wait_note(job: str, out_dir: Path) -> str:
    return (f"submitted job array {job} ({out_dir / 'sweep.sbatch'}); when it is done: "
            f"pretrain sweep collect {out_dir} && pretrain sweep fit {out_dir}")
