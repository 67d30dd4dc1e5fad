"""Run a sweep's points here, one after another, or submit them as one SLURM job array."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.sweep.spec import Point, SweepSpec


def run_local(points: list[Point], log=print) -> None:
    """Each point in turn (torchrun when its layout has several processes); a point that
    already finished is skipped, an interrupted one resumes."""
    for pt in points:
        world = pt.cfg.parallel.world_size
        prefix = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
                  if world > 1 else [sys.executable])
        cmd = [*prefix, "-m", "pretrain.cli", "train", "--config", str(pt.run_dir / "config.yaml"),
               "--resume", "auto"]
        log(f"sweep: point {pt.index} {pt.settings} -> {pt.run_dir}")
        with open(pt.run_dir / "train.log", "a") as fh:
            rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if rc != 0:
            raise ConfigError(f"sweep point {pt.index}: training failed (exit {rc}); "
                              f"see {pt.run_dir / 'train.log'}")


def submit_array(spec: SweepSpec, points: list[Point]) -> str:
    """One job array over the points (`--array=0-K%C`); task i trains point i."""
    from slurm.submit import JobSpec, render, sbatch

    s = dict(spec.slurm)
    concurrent = int(s.pop("concurrent", 0))
    world = points[0].cfg.parallel.world_size
    nodes = int(s.pop("nodes", 1))
    try:
        job = JobSpec(nodes=nodes, tasks_per_node=world // nodes, array=f"0-{len(points) - 1}"
                      + (f"%{concurrent}" if concurrent else ""), **s)
    except TypeError as e:
        raise ConfigError(f"{spec.path}: slurm: {e}") from None
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
