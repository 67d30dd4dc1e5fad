"""Making a write durable before something relies on it: a checkpoint sealed, a manifest that
names shards, a merge that deletes the streams the shards came from."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory (a directory: the names created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_no_link(path: str | Path, append: bool = False):
    """`path` opened for writing text (truncated, or `append`ed), never through a symbolic link:
    a link planted in a run directory would point our write at another of the user's files.
    Raises ConfigError, one line naming the path."""
    from core.config_schema import ConfigError

    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | (os.O_APPEND if append else os.O_TRUNC)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if Path(path).is_symlink():
            raise ConfigError(f"{path}: refused: a symbolic link (this program never writes "
                              "through one)") from None
        raise ConfigError(f"{path}: cannot write ({e.strerror})") from None
    return os.fdopen(fd, "a" if append else "w")


def new_file_mode() -> int:
    """The mode a file created now gets by default: 0666 less this process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
