"""`pretrain status DIR`: where a run -- or a tokenisation job's output directory -- stands,
from its files and SLURM."""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.checkpoint import store


def metrics(run_dir: Path) -> list[dict]:
    """The logged records of a run, oldest first. A line a crash cut short (and whatever a
    later append glued onto it) is skipped, not fatal: status must work on a killed run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def losses_by_step(run_dir: Path, key: str = "train/loss") -> dict[int, float]:
    """`key` per logged step; a step logged again after a resume keeps its last record."""
    return {r["step"]: r[key] for r in metrics(run_dir) if _is_number(r.get(key))}


def last_metrics(run_dir: Path, key: str = "train/loss") -> dict | None:
    """The newest record holding `key` as a number (training records; "val/loss": validation
    ones)."""
    rows = [r for r in metrics(run_dir) if _is_number(r.get(key))]
    return rows[-1] if rows else None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _max_steps(run_dir: Path) -> int | None:
    """train.max_steps of the run's config.yaml (None: none, or unreadable)."""
    from core.config_schema import ConfigError
    from pretrain.config import load_config

    try:
        return load_config(run_dir / "config.yaml", bases=False).train.max_steps
    except (OSError, ConfigError):
        return None


def live_holder(run_dir: Path) -> str | None:
    """Who holds the run directory's lock (pretrain/run/run_dir.py) now: its record, or None
    when no live process does. Probes with a shared lock; creates nothing."""
    import fcntl
    import os

    path = run_dir / ".lock"
    if not path.is_file() or path.is_symlink():
        return None
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
    finally:
        os.close(fd)  # drops the probe's lock too
    return None


def reached_step(saved: int | None, logged: dict | None) -> int | None:
    """The furthest step a run shows: its newest checkpoint's or its last logged record's."""
    return max((x for x in (saved, logged["step"] if logged else None) if x is not None),
               default=None)


def run_state(run_dir: Path, step: int | None) -> str:
    """finished, running, preempted or stopped, with step N of train.max_steps."""
    from core.exit_codes import PREEMPTED_MARKER

    total = _max_steps(run_dir)
    where = f"step {step if step is not None else 0} of {total if total else '?'}"
    holder = live_holder(run_dir)
    if holder is not None:
        return f"running ({where}; held by {holder})"
    if total and step is not None and step >= total:
        return f"finished ({where})"
    if (run_dir / PREEMPTED_MARKER).is_file():
        return f"preempted ({where}; it resumes with --resume auto when requeued)"
    return f"stopped ({where}; continue with --resume auto)"


def run_status(run_dir: Path) -> str:
    if not run_dir.is_dir():
        raise store.CheckpointError(f"{run_dir}: no such run directory")
    out = [f"run: {run_dir}"]
    m, val = last_metrics(run_dir), last_metrics(run_dir, "val/loss")
    speed = m.get("train/tokens_per_s") if m else None
    out.append(f"step: {m['step']}  loss {m['train/loss']:.4f}"
               + (f"  {speed:,.0f} tok/s" if _is_number(speed) else "") if m
               else "step: none logged yet")
    if val:
        out.append(f"validation: loss {val['val/loss']:.4f} at step {val['step']}")
    ckpt = store.newest(run_dir / "checkpoints")
    saved = None
    if ckpt is not None:
        meta = store.read_meta(ckpt)
        saved = meta["step"]
        out.append(f"tokens: {meta.get('tokens', 0):,} (at the last checkpoint)")
        out.append(f"last checkpoint: {ckpt} (step {saved})")
    else:
        out.append("last checkpoint: none")
    out.insert(1, f"state: {run_state(run_dir, reached_step(saved, m))}")
    job_file = run_dir / "slurm_job_id"
    if job_file.is_file():
        from slurm.submit import job_state

        job = job_file.read_text().strip()
        out.append(f"slurm job: {job} {job_state(job) or 'unknown to SLURM'}")
    return "\n".join(out)


def is_tokenisation(path: Path) -> bool:
    from data_pipeline.parts import PARTS, PLAN
    from data_pipeline.shards import MANIFEST

    return (path / PARTS / PLAN).is_file() or (path / MANIFEST).is_file()


def tokenisation_status(out: Path) -> str:
    """Parts done of the plan (or the merged manifest), and the SLURM jobs' states."""
    from data_pipeline.parts import PARTS, job_status
    from slurm.submit import job_state

    lines = [job_status(out)]
    jobs = out / PARTS / "jobs.json"
    if jobs.is_file():
        for what, job in json.loads(jobs.read_text()).items():
            lines.append(f"slurm {what} job: {job} {job_state(job) or 'unknown to SLURM'}")
    return "\n".join(lines)
