"""Read documents from text, .jsonl, .jsonl.gz and .jsonl.zst files, in a deterministic order.

A plain text file is one document. A JSON-lines file holds one document per line in the field
`text_field`. Non-UTF-8 bytes, broken JSON lines and empty documents are bad input: they raise
a `DataError` naming the file and line (or byte offset), or are counted and skipped.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path

from data_pipeline.badinput import BadInput, DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst")


def expand_inputs(paths: list[str]) -> list[Path]:
    """Files as given, directories expanded to their files (sorted), so order is stable."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: input not found")
    return files


def _open_binary(path: Path) -> io.BufferedIOBase:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _decode(raw: bytes, where: str, bad: BadInput) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad("documents", f"{where}: not UTF-8 (byte {e.start})")
        return None


def read_documents(path: Path, bad: BadInput, text_field: str = "text") -> Iterator[str]:
    if not path.name.endswith(JSONL_SUFFIXES):
        text = _decode(path.read_bytes(), str(path), bad)
        if text is not None:
            if text.strip():
                yield text
            else:
                bad("documents", f"{path}: empty document")
        return
    with _open_binary(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            line = _decode(raw, where, bad)
            if line is None or not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as e:
                bad("documents", f"{where}: invalid JSON ({e.msg})")
                continue
            text = doc.get(text_field) if isinstance(doc, dict) else None
            if not isinstance(text, str):
                bad("documents", f"{where}: no string field {text_field!r}")
            elif not text.strip():
                bad("documents", f"{where}: empty document")
            else:
                yield text


def iter_documents(paths: list[str], bad: BadInput, text_field: str = "text") -> Iterator[str]:
    for f in expand_inputs(paths):
        yield from read_documents(f, bad, text_field)


__all__ = ["DataError", "expand_inputs", "iter_documents", "read_documents"]
