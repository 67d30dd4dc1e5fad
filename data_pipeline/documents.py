"""Read the documents of one input unit (data_pipeline/inputs.py), in a deterministic order.

A plain text file is one document. A JSON-lines file holds one document per line in the field
`text_field`; a Parquet row group or an Arrow file one per row of the column `text_field`.

Bad records -- non-UTF-8 bytes, broken JSON lines, a missing field or a null, a column that is
not text, an unreadable file -- go through the `BadInput` policy: a DataError naming the file
and line, row group or row, or a counted, logged skip. Empty documents (nothing but white
space: an empty `__init__.py`) carry nothing to lose: they are counted as "empty documents"
and skipped, unless `empty="error"` makes them bad input.
"""

from __future__ import annotations

import gzip
import io
import json
import subprocess
from collections.abc import Iterator

from data_pipeline.badinput import BadInput, DataError
from data_pipeline.inputs import Unit, expand_inputs, sample_shares, units_of

EMPTY = "empty documents"


class Reader:
    """Documents of units under one bad-input policy; counts per input in `bad.by_input`."""

    def __init__(self, bad: BadInput, text_field: str = "text", empty: str = "skip"):
        if empty not in ("skip", "error"):
            raise DataError(f"--empty-documents: expected skip or error, got {empty!r}")
        self.bad, self.field, self.empty = bad, text_field, empty

    def unit(self, u: Unit, max_bytes: int = 0) -> Iterator[str]:
        """The unit's documents (with `max_bytes`, only the first ones up to that much text)."""
        self.bad.source = u.path
        docs = {"text": self._text, "jsonl": self._jsonl, "parquet": self._columnar,
                "arrow": self._columnar}[u.kind](u)
        taken = 0
        for where, text in docs:
            if text.strip():
                yield text
                taken += len(text)
                if max_bytes and taken >= max_bytes:
                    return
            elif self.empty == "error":
                self.bad("documents", f"{where}: empty document")
            else:
                self.bad.count(EMPTY)

    def _text(self, u: Unit):
        raw = _read_all(u.path)
        text = _decode(raw, u.path, self.bad)
        if text is not None:
            yield u.path, text

    def _jsonl(self, u: Unit):
        with _open_binary(u.path) as fh:
            for lineno, raw in enumerate(fh, start=1):
                where = f"{u.path}:{lineno}"
                line = _decode(raw, where, self.bad)
                if line is None or not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    self.bad("documents", f"{where}: invalid JSON ({e.msg})")
                    continue
                text = doc.get(self.field) if isinstance(doc, dict) else None
                if isinstance(text, str):
                    yield where, text
                else:
                    self.bad("documents", f"{where}: no string field {self.field!r}")

    def _columnar(self, u: Unit):
        """Parquet row group or Arrow file: the text column, checked for type first."""
        import pyarrow as pa

        try:
            table = _read_columnar(u, self.field)
        except DataError as e:
            self.bad("documents", str(e), _rows(u))
            return
        column = table.column(self.field)
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            self.bad("documents", f"{u.where()}: column {self.field!r} is {column.type}, not "
                                  "text", len(column))
            return
        for row, text in enumerate(column.to_pylist()):
            if text is None:
                self.bad("documents", f"{u.where()} row {row}: {self.field!r} is null")
            else:
                yield f"{u.where()} row {row}", text


def _rows(u: Unit) -> int:
    """Rows a unit that cannot be read stands for (counted as skipped documents), if known."""
    try:
        if u.kind == "parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(u.path).metadata.row_group(u.row_group).num_rows
    except Exception:  # unreadable: the unit counts as one
        pass
    return 1


def _read_columnar(u: Unit, field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if u.kind == "parquet":
            pf = pq.ParquetFile(u.path)
            if field not in pf.schema_arrow.names:
                raise DataError(f"{u.path}: no column {field!r} (columns: "
                                f"{', '.join(pf.schema_arrow.names)}; pass --text-field)")
            return pf.read_row_group(u.row_group, columns=[field])
        with pa.memory_map(u.path) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(source).read_all()
        if field not in table.column_names:
            raise DataError(f"{u.path}: no column {field!r} (columns: "
                            f"{', '.join(table.column_names)}; pass --text-field)")
        return table
    except DataError:
        raise
    except Exception as e:  # ArrowInvalid, OSError: corrupt page, truncated file, ...
        raise DataError(f"{u.where()}: unreadable {u.kind} ({type(e).__name__}: {e})") from None


def _read_all(path: str) -> bytes:
    with _open_binary(path) as fh:
        return fh.read()


def _open_binary(path: str) -> io.BufferedIOBase:
    """The file (or a pipe: command's output), decompressed by its suffix."""
    name = path.split()[-1] if path.startswith("pipe:") else path
    if path.startswith("pipe:"):
        raw: io.BufferedIOBase = _PipeReader(path[len("pipe:"):])
    else:
        raw = open(path, "rb")
    if name.endswith(".gz"):
        unzipped = gzip.GzipFile(fileobj=raw, mode="rb")
        unzipped.myfileobj = raw  # closed with it (as gzip.open does for a file it opened)
        return unzipped
    if name.endswith(".zst"):
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return raw


class _PipeReader(io.BufferedReader):
    """A shell command's standard output; a failing command is a DataError naming it."""

    def __init__(self, command: str):
        self.command = command
        self.proc = subprocess.Popen(["sh", "-c", command], stdout=subprocess.PIPE)
        super().__init__(self.proc.stdout)

    def close(self) -> None:
        if self.closed:
            return
        super().close()
        if self.proc.wait() != 0:
            raise DataError(f"pipe:{self.command}: exited with status {self.proc.returncode}")


def _decode(raw: bytes, where: str, bad: BadInput) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad("documents", f"{where}: not UTF-8 (byte {e.start})")
        return None


def iter_documents(paths: list[str], bad: BadInput, text_field: str = "text",
                   empty: str = "skip", sample_bytes: int = 0) -> Iterator[str]:
    """Every document of the inputs, in order; with `sample_bytes`, only the first documents
    of each unit up to its share of that many bytes (inputs.sample_shares): a deterministic
    sample across all inputs that reads little more than it keeps."""
    reader = Reader(bad, text_field, empty)
    units = units_of(expand_inputs(paths), bad)
    shares = sample_shares(units, sample_bytes) if sample_bytes else [0] * len(units)
    for u, share in zip(units, shares, strict=True):
        yield from reader.unit(u, share)


__all__ = ["DataError", "Reader", "iter_documents"]
