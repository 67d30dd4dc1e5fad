"""Who owns a directory the tools write: one live job per run directory (a lock), no fresh
start over another run's checkpoints, and no output written over an old one -- unless the user
says `--overwrite`, which moves the old one aside (renamed, never deleted).

The lock is an advisory `flock` on `<out_dir>/.lock` held by rank 0 for the whole job. The
kernel drops it when the holder dies (however it dies), so a requeued or resubmitted job takes
it over from a dead one without anyone cleaning up; the file says who holds it (job id, host,
pid), for the one-line refusal a second live job gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from pretrain.checkpoint.store import set_aside
from pretrain.config import ConfigError

LOCK = ".lock"


def move_aside(path: Path) -> Path:
    """Rename `path` to `<path>.old-<time>` (a suffix if that exists too); the new name."""
    path = Path(os.path.abspath(path))  # `.` and `..` named as the directories they are
    here = Path.cwd().resolve()
    if not path.name or path.resolve() == here or path.resolve() in here.parents:
        raise ConfigError(f"{path}: refused to move it aside: it is the current directory, one "
                          "above it, or the root; name a directory of its own for the output")
    return set_aside(path, "old-" + time.strftime("%Y%m%d-%H%M%S"))


def claim_output(path: str | Path, overwrite: bool, what: str) -> str | None:
    """Make `path` a directory this command may fill: missing or empty is fine; anything else
    is refused in one line, or with `overwrite` moved aside (the returned note says where)."""
    p = Path(path)
    if not p.exists() or (p.is_dir() and not any(p.iterdir())):
        return None
    if not overwrite:
        raise ConfigError(f"{p}: already exists and is not empty ({what}); choose a new "
                          "directory, or pass --overwrite to move the old one aside")
    return f"moved the old {p} aside to {move_aside(p)}"


def claim_fresh_run(out_dir: Path, overwrite: bool) -> str | None:
    """A run that starts from step 0 in `out_dir`: refused when the directory already holds a
    run's checkpoints (they would be replaced and pruned across two trajectories), unless
    `overwrite` moves that run aside."""
    from pretrain.checkpoint import store

    newest = store.newest(out_dir / "checkpoints")
    if newest is None:
        return None
    if not overwrite:
        raise ConfigError(f"train.out_dir {out_dir}: holds a run's checkpoints (newest "
                          f"{newest.name}); continue it with --resume auto, or pass --overwrite "
                          "to move the old run aside")
    return f"moved the old run aside to {move_aside(out_dir)}"


def own_run(out_dir: Path, fresh: bool, overwrite: bool) -> tuple[RunLock, str | None]:
    """Lock `out_dir` for this job, then (a `fresh` start) check it holds no other run --
    under the lock, so `--overwrite` never moves a live job's directory. A moved-aside run
    takes its lock file along; the lock is taken again on the new directory."""
    lock = RunLock(out_dir)
    lock.acquire()
    try:
        note = claim_fresh_run(out_dir, overwrite) if fresh else None
    except BaseException:
        lock.release()
        raise
    if note is not None:
        lock.release()
        lock.acquire()
    return lock, note


class RunLock:
    """An exclusive lock on a run directory for this process's lifetime (see the module)."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_symlink() or (self.path.exists() and not self.path.is_file()):
            raise ConfigError(f"{self.path}: refused: not a plain file (a link or a directory "
                              "where the run lock belongs)")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"{self.path.parent}: another live job is running in this run "
                              f"directory ({holder}); wait for it, or use another "
                              "train.out_dir") from None
        me = {"job": os.environ.get("SLURM_JOB_ID", ""), "host": socket.gethostname(),
              "pid": os.getpid()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock; the file stays (no unlink race)
            self.fd = None
