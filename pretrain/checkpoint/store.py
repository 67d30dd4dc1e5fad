"""Checkpoint directories on disk: naming, atomic sealing, `latest`, pruning, verification.

A checkpoint is `step_XXXXXXX/` holding DCP shard files (`__<rank>_0.distcp`, `.metadata`),
`config.yaml` and `meta.json` (the global record, with every file's size and CRC-32). It is
written as `step_XXXXXXX.tmp/`; once every rank's shards are on disk, rank 0 writes
`meta.json`, fsyncs, renames the directory and then replaces `latest` -- so a crash at any
point leaves the previous checkpoint complete and the partial one recognisably incomplete.
Tensors are read back by DCP with `torch.load(..., weights_only=True)`; the record is JSON.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import shutil
import zlib
from pathlib import Path

from core.config_schema import KIND_NAMES, is_kind
from core.durable import fsync_path

META = "meta.json"
LATEST = "latest"
_STEP = re.compile(r"^step_(\d{7,})$")
_PARTIAL = re.compile(r"^step_(\d{7,})\.tmp$")  # a save in progress, or one a crash cut short


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, incomplete, corrupt or incompatible."""


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:07d}"


def step_of(d: Path) -> int:
    return int(_STEP.match(d.name).group(1))


REQUIRED = (META, ".metadata", "config.yaml")


def is_complete(d: Path) -> bool:
    return bool(_STEP.match(d.name)) and all((d / name).is_file() for name in REQUIRED)


def complete_checkpoints(root: Path) -> list[Path]:
    """Sealed checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if is_complete(d)), key=step_of)


def incomplete(root: Path) -> list[Path]:
    """Directories a crash left behind mid-save: `step_N.tmp` and nothing else (a user's
    `step_N.keep` copy, or a checkpoint being copied in, is not ours to remove)."""
    if not root.is_dir():
        return []
    return [d for d in root.iterdir() if d.is_dir() and _PARTIAL.match(d.name)]


def set_aside(d: Path, why: str) -> Path:
    """Rename `d` to `<d>.<why>` (a suffix if taken); the new name. A checkpoint so named is
    out of the run's sight: no resume picks it, no pruning removes it; the user decides."""
    aside, n = d.with_name(f"{d.name}.{why}"), 1
    while aside.exists():
        aside, n = d.with_name(f"{d.name}.{why}-{n}"), n + 1
    d.rename(aside)
    return aside


def resolve(where: str | Path) -> Path:
    """A sealed checkpoint from what users type: a step directory, the `latest` pointer file,
    a checkpoints root or a run directory (the newest complete one; incomplete are skipped)."""
    p = Path(where)
    if p.name == LATEST and p.is_file():
        p = p.parent / p.read_text().strip()
    if _STEP.match(p.name.removesuffix(".tmp")) and p.is_dir():
        if not is_complete(p):
            missing = next(name for name in REQUIRED if not (p / name).is_file())
            raise CheckpointError(f"{p}: incomplete checkpoint (no {missing}: the save did not "
                                  "finish, or it was damaged)")
        return p
    for root in (p / "checkpoints", p):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise CheckpointError(f"{p}: no complete checkpoint found")


def newest(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def describe(path: Path) -> dict:
    """Size and CRC-32 of a file (read back from the page cache right after writing)."""
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def verify(d: Path, files: dict[str, dict]) -> list[str]:
    """One message per listed file that is missing or differs from its record."""
    errors = []
    for name, want in files.items():
        f = d / name
        if Path(name).name != name or name in ("", ".", ".."):  # the record is untrusted too
            errors.append(f"{d / META}: file name {name!r} is not inside the checkpoint")
        elif f.is_symlink():  # a link could point at any file of the user's
            errors.append(f"{f}: refused: a symbolic link, not a file of the checkpoint")
        elif not f.is_file():
            errors.append(f"{f}: shard file missing")
        elif f.stat().st_size != want["bytes"]:
            errors.append(f"{f}: shard file has {f.stat().st_size} bytes, the checkpoint "
                          f"recorded {want['bytes']} (truncated or overwritten)")
        elif describe(f)["crc32"] != want["crc32"]:
            errors.append(f"{f}: shard file is corrupt (CRC-32 mismatch)")
    return errors


def read_meta(d: Path) -> dict:
    """The record, checked for the shape its readers rely on (it is untrusted like the rest):
    `step` and `tokens` counts, a `layout` of positive sizes, and `files` naming `.metadata`
    with every file's size and CRC-32. A record of another shape is one CheckpointError."""
    where = d / META
    try:
        meta = json.loads(where.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: unreadable checkpoint record ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: not a checkpoint record (a JSON object)")
    count(meta, "step", where)
    count(meta, "tokens", where, default=0)
    layout = field(meta, "layout", dict, where)
    for k in ("tensor", "pipeline", "data"):
        count(layout, k, f"{where}: layout", least=1)
    files = field(meta, "files", dict, where)
    if ".metadata" not in files:
        raise CheckpointError(f"{where}: files: .metadata is not listed")
    for name, entry in files.items():
        at = f"{where}: files[{name!r}]"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{at}: expected an object with bytes and crc32")
        count(entry, "bytes", at)
        if count(entry, "crc32", at) >= 1 << 32:
            raise CheckpointError(f"{at}: crc32 is not a 32-bit value")
    return meta




def field(obj: dict, key: str, kind: type, where, default=None):
    """`obj[key]` if it is a `kind` (a bool is no int); `default` when absent, if one is given."""
    if key not in obj:
        if default is None:
            raise CheckpointError(f"{where}: no {key}")
        return default
    value = obj[key]
    if not is_kind(value, kind):
        raise CheckpointError(f"{where}: {key} is {reprlib.repr(value)}, not {KIND_NAMES[kind]}")
    return value


def count(obj: dict, key: str, where, least: int = 0, default: int | None = None) -> int:
    """`obj[key]` as an int of at least `least`."""
    value = field(obj, key, int, where, default)
    if value < least:
        raise CheckpointError(f"{where}: {key} is {value}, below {least}")
    return value


def seal(tmp: Path, meta: dict) -> Path:
    """Write the record, make everything durable, rename `tmp` to its final name, then point
    `latest` at it (each step atomic)."""
    (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
    for f in tmp.iterdir():
        fsync_path(f)
    fsync_path(tmp)
    final = tmp.with_name(tmp.name.removesuffix(".tmp"))
    aside = None
    if final.exists():  # a re-run of the same step (resumed from an older checkpoint):
        aside = final.with_name(final.name + ".replaced")  # moved, not deleted, until the new
        remove_stale(aside)  # one has its name
        final.rename(aside)
    tmp.rename(final)
    link = final.parent / (LATEST + ".tmp")
    remove_stale(link)
    with open(link, "x") as fh:  # O_EXCL: created here, never a file a link points at
        fh.write(final.name + "\n")
    os.replace(link, final.parent / LATEST)
    fsync_path(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def remove_stale(p: Path) -> None:
    """Clear a temporary name (`step_N.tmp`, `latest.tmp`) a crash may have left: a directory
    or file is removed, a symbolic link unlinked -- never followed, so a link planted there
    cannot point a save at another directory of the user's."""
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


def prune(root: Path, keep_last: int, sealed: Path) -> list[Path]:
    """Keep the newest `keep_last` complete checkpoints up to the one just `sealed` (0: keep
    all): only older steps of its own trajectory are removed, never `sealed` itself nor a newer
    step (another trajectory's, which only the user may remove)."""
    older = [d for d in complete_checkpoints(root) if step_of(d) < step_of(sealed)]
    doomed = older[:max(len(older) - keep_last + 1, 0)] if keep_last else []
    for d in doomed:
        shutil.rmtree(d, ignore_errors=True)
    return doomed
