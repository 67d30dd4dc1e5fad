"""Tokenise documents into webdataset tar shards of fixed-size token chunks, plus a manifest.

Documents are tokenised in order (optionally by a process pool, which preserves order, so the
output does not depend on --workers), each followed by EOS, and the concatenated stream is cut
into chunks of `chunk_tokens` (the last may be shorter: nothing is dropped). Every shard holds
`shard_tokens // chunk_tokens` chunks as tar members `KEY.tok` (raw little-endian uint16, or
uint32 when the vocabulary does not fit). `manifest.json`, written last and atomically, lists
the shards with their token counts, the dtype, vocabulary size, EOS id and the tokenizer's hash.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds

from core.durable import fsync_path
from data_pipeline.badinput import BadInput, DataError
from data_pipeline.documents import Reader
from data_pipeline.inputs import Unit, expand_inputs, units_of
from data_pipeline.tokenizer import EOS_TOKEN, eos_id, load_tokenizer, tokenizer_hash

MANIFEST = "manifest.json"
FORMAT = "looped-pretrain-shards/1"
SUFFIX = "tok"


@dataclass
class ShardInfo:
    name: str
    tokens: int
    chunks: int


@dataclass
class Manifest:
    shards: list[ShardInfo]
    dtype: str
    vocab_size: int
    eos_id: int
    tokenizer_sha256: str
    chunk_tokens: int
    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    # the held-out split written beside these shards: {"path", "fraction", "documents", "tokens"}
    validation: dict = field(default_factory=dict)
    # per input file: {"path", "documents", "tokens" (EOS included; both splits), "skipped"}
    inputs: list[dict] = field(default_factory=list)
    format: str = FORMAT

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def save(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        body = asdict(self) | {"total_tokens": self.total_tokens}
        tmp.write_text(json.dumps(body, indent=1))
        fsync_path(tmp)
        tmp.rename(directory / MANIFEST)
        fsync_path(directory)  # the rename itself durable

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        path = Path(directory) / MANIFEST
        if not path.is_file():
            raise DataError(f"{path}: manifest not found (run `pretrain data tokenize` first)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise DataError(f"{path}: field 'format' must be {FORMAT!r}")
        want = {"dtype": str, "vocab_size": int, "eos_id": int, "tokenizer_sha256": str,
                "chunk_tokens": int, "shards": list}
        for key, tp in want.items():
            if not isinstance(raw.get(key), tp):
                raise DataError(f"{path}: field {key!r} missing or not {tp.__name__}")
        if raw["dtype"] not in ("uint16", "uint32"):
            raise DataError(f"{path}: field 'dtype' must be uint16 or uint32, got {raw['dtype']!r}")
        shards = []
        for i, s in enumerate(raw["shards"]):
            if not (isinstance(s, dict) and isinstance(s.get("name"), str)
                    and isinstance(s.get("tokens"), int) and isinstance(s.get("chunks"), int)):
                raise DataError(f"{path}: shards[{i}] needs name (str), tokens and chunks (int)")
            if not SHARD_NAME.fullmatch(s["name"]) or ".." in s["name"]:
                raise DataError(f"{path}: shards[{i}].name {s['name']!r} is not a shard file name "
                                "(letters, digits, '.', '_', '-'; no path separator, no leading "
                                "'-' or '.')")
            shards.append(ShardInfo(s["name"], s["tokens"], s["chunks"]))
        return cls(shards=shards, dtype=raw["dtype"], vocab_size=raw["vocab_size"],
                   eos_id=raw["eos_id"], tokenizer_sha256=raw["tokenizer_sha256"],
                   chunk_tokens=raw["chunk_tokens"], documents=raw.get("documents", 0),
                   skipped=raw.get("skipped", {}), validation=raw.get("validation", {}),
                   inputs=raw.get("inputs", []))


VALIDATION_DIR = "validation"
# what a shard name in a manifest may be: it is joined to a directory and substituted into a
# url_template (a `pipe:` one is a shell command), so nothing that could leave either
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_worker_tokenizer = None
_worker_fraction = 0.0


def _init_worker(path: str, fraction: float) -> None:
    global _worker_tokenizer, _worker_fraction
    _worker_tokenizer, _worker_fraction = load_tokenizer(path), fraction


def held_out(text: str, fraction: float) -> bool:
    """The document-level split: a document is held out when its content hash falls below
    `fraction` -- the same document always lands on the same side, whatever the order."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < fraction * 2**64


def _encode(batch: list[tuple[int, str]]) -> list[tuple[int, bool, list[int]]]:
    encoded = _worker_tokenizer.encode_batch([t for _, t in batch], add_special_tokens=False)
    return [(i, held_out(text, _worker_fraction), e.ids)
            for (i, text), e in zip(batch, encoded, strict=True)]


class ShardSink:
    """Token chunks of one output directory: `add` a document's ids (EOS included), or a run
    of several documents' (`documents`: how many). The chunks depend only on the stream."""

    def __init__(self, out: Path, dtype, chunk_tokens: int, per_shard: int):
        self.out, self.dtype, self.chunk, self.per_shard = out, dtype, chunk_tokens, per_shard
        self.chunks: list[int] = []
        self.names: list[str] = []
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.documents = 0
        self.writer = None

    def add(self, ids: np.ndarray, documents: int = 1) -> None:
        self.documents += documents
        self.pending.append(ids)
        self.pending_len += len(ids)
        if self.pending_len >= self.chunk:
            flat = np.concatenate(self.pending)
            full = len(flat) // self.chunk * self.chunk
            for start in range(0, full, self.chunk):
                self._emit(flat[start:start + self.chunk])
            self.pending, self.pending_len = [flat[full:]], len(flat) - full

    def _emit(self, chunk: np.ndarray) -> None:
        if self.writer is None:
            self.out.mkdir(parents=True, exist_ok=True)
            self.writer = wds.ShardWriter(str(self.out / "shard-%06d.tar"), maxcount=self.per_shard,
                                          maxsize=1 << 62, verbose=0,
                                          post=lambda fname: self.names.append(Path(fname).name))
        self.writer.write({"__key__": f"{len(self.chunks):010d}", SUFFIX: chunk.tobytes()})
        self.chunks.append(len(chunk))

    def close(self, flush: bool) -> list[ShardInfo]:
        if flush and self.pending_len:
            self._emit(np.concatenate(self.pending))
        if self.writer is not None:
            self.writer.close()
        k = self.per_shard
        return [ShardInfo(name, sum(self.chunks[i * k:(i + 1) * k]),
                          len(self.chunks[i * k:(i + 1) * k])) for i, name in enumerate(self.names)]


@dataclass
class Tokenizing:
    """What every tokenisation shares: the tokenizer and the settings of the output."""

    tokenizer_path: str
    shard_tokens: int = 1 << 26
    chunk_tokens: int = 8192
    text_field: str = "text"
    eos_token: str = EOS_TOKEN
    on_error: str = "raise"
    empty: str = "skip"  # empty documents: skip (counted) or error
    validation_fraction: float = 0.0
    workers: int = 1

    def check(self) -> None:
        if self.chunk_tokens < 1 or self.shard_tokens < self.chunk_tokens:
            raise DataError(f"--shard-tokens ({self.shard_tokens}) must be >= --chunk-tokens "
                            f"({self.chunk_tokens}) >= 1")
        if not 0 <= self.validation_fraction < 1:
            raise DataError(f"--validation-fraction: must be in [0, 1), got "
                            f"{self.validation_fraction}")

    def vocabulary(self) -> tuple:
        """(tokenizer, EOS id, vocabulary size, the token dtype)."""
        tok = load_tokenizer(self.tokenizer_path)
        vocab = tok.get_vocab_size(with_added_tokens=True)
        return tok, eos_id(tok, self.eos_token), vocab, np.uint16 if vocab <= 1 << 16 else np.uint32


def _batches(docs, size: int):
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


class InputCounts:
    """Documents and tokens per input file (one row per file, in reading order, also when
    nothing of it was kept), with the skips the reader counted there."""

    def __init__(self, units: list[Unit]):
        self.rows = {u.path: {"path": u.path, "documents": 0, "tokens": 0, "skipped": {}}
                     for u in units}

    def add(self, path: str, tokens: int, documents: int = 1) -> None:
        self.rows[path]["documents"] += documents
        self.rows[path]["tokens"] += tokens

    def merge_skips(self, by_input: dict) -> None:
        for path, counts in by_input.items():  # a file skipped whole has no units: a row now
            row = self.rows.setdefault(path, {"path": path, "documents": 0, "tokens": 0,
                                              "skipped": {}})["skipped"]
            for kind, n in counts.items():
                row[kind] = row.get(kind, 0) + n

    def table(self) -> list[dict]:
        return list(self.rows.values())


def encode_units(units: list[Unit], how: Tokenizing, bad: BadInput, eos: int, dtype,
                 counts: InputCounts, progress: str = ""):
    """(held out?, ids + EOS) of every document of the units, in order, counted per input
    (a process pool, which keeps order, with workers > 1)."""
    from tqdm import tqdm

    reader = Reader(bad, how.text_field, how.empty)
    docs = ((i, text) for i, u in enumerate(units) for text in reader.unit(u))
    pool = None
    if how.workers > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pool = multiprocessing.get_context("fork").Pool(
            how.workers, _init_worker, (how.tokenizer_path, how.validation_fraction))
        encoded = pool.imap(_encode, _batches(docs, 64), chunksize=4)
    else:
        _init_worker(how.tokenizer_path, how.validation_fraction)
        encoded = map(_encode, _batches(docs, 64))
    bar = tqdm(unit=" docs", desc=progress, disable=None if progress else True, mininterval=1.0)
    try:
        for batch in encoded:
            for i, is_held, ids in batch:
                counts.add(units[i].path, len(ids) + 1)
                yield is_held, np.array([*ids, eos], dtype=dtype)
            bar.update(len(batch))
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
        counts.merge_skips(bad.by_input)


def write_manifests(out: Path, how: Tokenizing, vocab: tuple, train: list[ShardInfo],
                    train_docs: int, held: list[ShardInfo], held_docs: int, skipped: dict,
                    inputs: list[dict], what: str) -> Manifest:
    """The training manifest (and the held-out split's), written last; no shards at all is a
    DataError naming `what` was read."""
    tok, eos, size, dtype = vocab
    if not train:
        raise DataError(f"{what}: no documents to tokenize" + (" (all held out)" if held else ""))

    def manifest(shards, documents, validation=None, rows=()) -> Manifest:
        return Manifest(shards=shards, dtype=np.dtype(dtype).name, vocab_size=size, eos_id=eos,
                        tokenizer_sha256=tokenizer_hash(tok), chunk_tokens=how.chunk_tokens,
                        documents=documents, skipped=dict(skipped), validation=validation or {},
                        inputs=list(rows))

    record = {}
    _durable(out, train)
    if held:
        _durable(out / VALIDATION_DIR, held)
        split = manifest(held, held_docs)
        split.save(out / VALIDATION_DIR)
        record = {"path": VALIDATION_DIR, "fraction": how.validation_fraction,
                  "documents": held_docs, "tokens": split.total_tokens}
    result = manifest(train, train_docs, record, inputs)
    result.save(out)
    return result


def check_output(out: Path) -> None:
    """Shards are only ever written into a directory that holds none: an old manifest, or
    shards a killed run left without one, would be overwritten name by name."""
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: already holds a {MANIFEST}; write shards to a new directory")
    left = sorted(out.glob("shard-*.tar")) + sorted(out.glob(f"{VALIDATION_DIR}/shard-*.tar"))
    if left:
        raise DataError(f"{out}: holds shards without a {MANIFEST} ({left[0].name}...: an "
                        "interrupted run?); write to a new directory or remove them")


def _durable(directory: Path, shards: list[ShardInfo]) -> None:
    """Shard files and their directory on disk before a manifest names them (and before a
    merge deletes the part streams they came from)."""
    for path in [*(directory / s.name for s in shards), directory]:
        fsync_path(path)


def tokenize_to_shards(inputs: list[str], output: str | Path, tokenizer_path: str | Path,
                       progress: bool = True, **settings) -> Manifest:
    """`write_shards` with the settings as keywords (the fields of `Tokenizing`)."""
    return write_shards(inputs, Path(output), Tokenizing(str(tokenizer_path), **settings), progress)


def write_shards(inputs: list[str], out: Path, how: Tokenizing, progress: bool = True) -> Manifest:
    """Shards of `inputs` in `out`; with validation_fraction f > 0 the documents whose hash
    falls below f go to `out/validation/` instead (its own manifest, recorded in the training
    manifest's `validation`)."""
    how.check()
    check_output(out)
    bad = BadInput(how.on_error)
    units = units_of(expand_inputs(inputs), bad)
    out.mkdir(parents=True, exist_ok=True)
    vocab = how.vocabulary()
    _, eos, _, dtype = vocab
    counts = InputCounts(units)
    per_shard = how.shard_tokens // how.chunk_tokens
    train = ShardSink(out, dtype, how.chunk_tokens, per_shard)
    held = ShardSink(out / VALIDATION_DIR, dtype, how.chunk_tokens, per_shard)
    ok = False
    try:
        for is_held, ids in encode_units(units, how, bad, eos, dtype, counts,
                                         f"tokenizing -> {out}" if progress else ""):
            (held if is_held else train).add(ids)
        ok = True
    finally:
        shards, held_shards = train.close(ok), held.close(ok)
    return write_manifests(out, how, vocab, shards, train.documents, held_shards, held.documents,
                           bad.counts, counts.table(), ", ".join(inputs))
