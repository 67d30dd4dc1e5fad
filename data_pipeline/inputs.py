"""What a tokenisation reads, as an ordered list of units.

Inputs are files, directories (their files, sorted), glob patterns (matches, sorted) or
`pipe:COMMAND` (the command's standard output: a remote object, e.g. `pipe:aws s3 cp
s3://b/x.jsonl.zst -`; its format is the command's last word's suffix). A directory saved by
Hugging Face `datasets.save_to_disk` (state.json + *.arrow) is one dataset input, not a folder
of files. Each input becomes units, in a stable order:

  text / JSON lines (.gz, .zst), pipe:   one unit per file (or command)
  Parquet                                one unit per row group
  Arrow (save_to_disk)                   one unit per .arrow file, in state.json's order

Units are what a job array splits (`split_parts`: contiguous ranges balanced by bytes, so the
parts' outputs in part order are the single-process output) and what `--sample-bytes` samples.
"""

from __future__ import annotations

import glob
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from data_pipeline.badinput import BadInput, DataError

PARQUET = (".parquet", ".pq")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")
ARROW_STATE = "state.json"


@dataclass(frozen=True)
class Unit:
    path: str  # the file (or pipe:COMMAND) it reads
    kind: str  # text | jsonl | parquet | arrow
    row_group: int = -1  # parquet: which row group
    bytes: int = 1  # on disk (compressed), for balancing; 1 when unknown

    def where(self) -> str:
        return f"{self.path} row group {self.row_group}" if self.kind == "parquet" else self.path

    def to_dict(self) -> dict:
        return asdict(self)


def kind_of(name: str) -> str:
    if name.endswith(PARQUET):
        return "parquet"
    if name.endswith(".arrow"):
        return "arrow"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else "text"


def _arrow_files(directory: Path) -> list[Path]:
    """The .arrow files of a `save_to_disk` directory (a DatasetDict: each split in order)."""
    split_file = directory / "dataset_dict.json"
    if split_file.is_file():
        try:
            splits = json.loads(split_file.read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{split_file}: unreadable ({e})") from None
        return [f for s in splits for f in _arrow_files(directory / s)]
    try:
        names = [d["filename"] for d in json.loads((directory / ARROW_STATE).read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, OSError) as e:
        raise DataError(f"{directory / ARROW_STATE}: not a datasets save_to_disk state ({e})") from None
    return [directory / n for n in names]


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / ARROW_STATE).is_file() or (p / "dataset_dict.json").is_file())


def expand_inputs(paths: list[str]) -> list[str]:
    """Files (absolute paths) and the pipe: commands typed as inputs, in reading order; a
    pattern or path matching nothing is a DataError naming it."""
    files: list[str] = []
    for raw in paths:
        if raw.startswith("pipe:"):  # typed as a command: the only way a unit becomes one
            files.append(raw)
            continue
        matches = sorted(glob.glob(raw, recursive=True)) if glob.has_magic(raw) else [raw]
        if not matches:
            raise DataError(f"{raw}: no input matches the pattern")
        # absolute: a file found in a directory or by a pattern whose name starts with
        # "pipe:" must stay a file, never turn into a command
        for m in (Path(x).absolute() for x in matches):
            if _is_saved_dataset(m):
                files.extend(str(f) for f in _arrow_files(m))
            elif m.is_dir():
                inside = sorted(f for f in m.rglob("*") if f.is_file())
                datasets = {d for d in m.rglob(ARROW_STATE)}
                if datasets:  # a folder of saved datasets: each dataset's own order
                    for d in sorted(p.parent for p in datasets):
                        files.extend(str(f) for f in _arrow_files(d))
                    inside = [f for f in inside if not any(d.parent in f.parents for d in datasets)]
                files.extend(str(f) for f in inside)
            elif m.is_file():
                files.append(str(m))
            else:
                raise DataError(f"{m}: input not found")
    return files


def units_of(files: list[str], bad: BadInput | None = None) -> list[Unit]:
    """Every file's units. A Parquet file's row groups come from its footer, read here: an
    unreadable one is a DataError naming it, or -- under a `bad` policy of skip -- a counted
    skipped file."""
    units: list[Unit] = []
    for f in files:
        kind = kind_of(f.split()[-1] if f.startswith("pipe:") else f)
        if f.startswith("pipe:"):
            if kind in ("parquet", "arrow"):
                raise DataError(f"{f}: {kind} needs a seekable file; copy it or mount the store")
            units.append(Unit(f, kind))
        elif kind == "parquet":
            try:
                units.extend(Unit(f, kind, g, max(size, 1)) for g, size in _row_groups(f))
            except DataError as e:
                if bad is None:
                    raise
                bad.source = f
                bad("files", str(e))
        else:
            units.append(Unit(f, kind, bytes=max(Path(f).stat().st_size, 1)))
    return units


def _row_groups(path: str) -> list[tuple[int, int]]:
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path).metadata
    except Exception as e:  # ArrowInvalid, OSError: not Parquet, truncated footer, ...
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(g, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]


def split_parts(units: list[Unit], n: int) -> list[list[int]]:
    """Unit indices of n contiguous parts balanced by bytes: a unit goes to the part whose
    share of the running byte total holds the unit's middle (empty parts when the units are
    fewer or one unit outweighs a share)."""
    total = sum(u.bytes for u in units)
    parts: list[list[int]] = [[] for _ in range(n)]
    run = 0
    for i, u in enumerate(units):
        parts[min(n - 1, (2 * run + u.bytes) * n // (2 * total))].append(i)
        run += u.bytes
    return parts


def sample_shares(units: list[Unit], sample_bytes: int) -> list[int]:
    """Bytes of text to take from the start of each unit for a sample of about `sample_bytes`
    spread over all inputs in proportion to their size (deterministic: no randomness)."""
    total = sum(u.bytes for u in units)
    return [max(1, sample_bytes * u.bytes // total) for u in units]
