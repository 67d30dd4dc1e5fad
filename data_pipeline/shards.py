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
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipeline.badinput import BadInput, DataError
from data_pipeline.documents import iter_documents
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
    format: str = FORMAT

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.shards)

    def save(self, directory: Path) -> None:
        tmp = directory / (MANIFEST + ".tmp")
        body = asdict(self) | {"total_tokens": self.total_tokens}
        tmp.write_text(json.dumps(body, indent=1))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.rename(directory / MANIFEST)

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
            shards.append(ShardInfo(s["name"], s["tokens"], s["chunks"]))
        return cls(shards=shards, dtype=raw["dtype"], vocab_size=raw["vocab_size"],
                   eos_id=raw["eos_id"], tokenizer_sha256=raw["tokenizer_sha256"],
                   chunk_tokens=raw["chunk_tokens"], documents=raw.get("documents", 0),
                   skipped=raw.get("skipped", {}), validation=raw.get("validation", {}))


VALIDATION_DIR = "validation"
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


def _encode(batch: list[str]) -> list[tuple[bool, list[int]]]:
    encoded = _worker_tokenizer.encode_batch(batch, add_special_tokens=False)
    return [(held_out(text, _worker_fraction), e.ids) for text, e in zip(batch, encoded, strict=True)]


class _ShardSink:
    """Token chunks of one output directory: `add` a document's ids (EOS included)."""

    def __init__(self, out: Path, dtype, chunk_tokens: int, per_shard: int):
        self.out, self.dtype, self.chunk, self.per_shard = out, dtype, chunk_tokens, per_shard
        self.chunks: list[int] = []
        self.names: list[str] = []
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.documents = 0
        self.writer = None

    def add(self, ids: np.ndarray) -> None:
        self.documents += 1
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


def _batches(docs, size: int):
    it = iter(docs)
    while batch := list(islice(it, size)):
        yield batch


def tokenize_to_shards(
    inputs: list[str],
    output: str | Path,
    tokenizer_path: str | Path,
    shard_tokens: int = 1 << 26,
    chunk_tokens: int = 8192,
    workers: int = 1,
    text_field: str = "text",
    eos_token: str = EOS_TOKEN,
    on_error: str = "raise",
    progress: bool = True,
    validation_fraction: float = 0.0,
) -> Manifest:
    """Shards of `inputs` in `output`; with `validation_fraction` f > 0 the documents whose
    hash falls below f go to `output/validation/` instead (its own manifest, recorded in the
    training manifest's `validation`)."""
    from tqdm import tqdm

    if chunk_tokens < 1 or shard_tokens < chunk_tokens:
        raise DataError(f"--shard-tokens ({shard_tokens}) must be >= --chunk-tokens ({chunk_tokens}) >= 1")
    if not 0 <= validation_fraction < 1:
        raise DataError(f"--validation-fraction: must be in [0, 1), got {validation_fraction}")
    out = Path(output)
    if (out / MANIFEST).exists():
        raise DataError(f"{out}: already holds a {MANIFEST}; write shards to a new directory")
    out.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer(tokenizer_path)
    eos, vocab = eos_id(tok, eos_token), tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
    bad = BadInput(on_error)
    docs = iter_documents(inputs, bad, text_field)
    per_shard = shard_tokens // chunk_tokens
    train = _ShardSink(out, dtype, chunk_tokens, per_shard)
    held = _ShardSink(out / VALIDATION_DIR, dtype, chunk_tokens, per_shard)
    pool = None
    if workers > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pool = multiprocessing.get_context("fork").Pool(
            workers, _init_worker, (str(tokenizer_path), validation_fraction))
        encoded = pool.imap(_encode, _batches(docs, 64), chunksize=4)
    else:
        _init_worker(str(tokenizer_path), validation_fraction)
        encoded = map(_encode, _batches(docs, 64))
    bar = tqdm(unit=" docs", desc=f"tokenizing -> {out}", disable=None if progress else True,
               mininterval=1.0)
    ok = False
    try:
        for batch in encoded:
            for is_held, ids in batch:
                (held if is_held else train).add(np.array([*ids, eos], dtype=dtype))
            bar.update(len(batch))
        ok = True
    finally:
        shards, held_shards = train.close(ok), held.close(ok)
        bar.close()
        if pool is not None:
            pool.terminate()
    if not shards:
        raise DataError(f"{', '.join(inputs)}: no documents to tokenize"
                        + (" (all held out)" if held_shards else ""))

    def manifest(shard_list, documents, validation=None) -> Manifest:
        return Manifest(shards=shard_list, dtype=np.dtype(dtype).name, vocab_size=vocab,
                        eos_id=eos, tokenizer_sha256=tokenizer_hash(tok),
                        chunk_tokens=chunk_tokens, documents=documents, skipped=dict(bad.counts),
                        validation=validation or {})

    record = {}
    if held_shards:
        split = manifest(held_shards, held.documents)
        split.save(out / VALIDATION_DIR)
        record = {"path": VALIDATION_DIR, "fraction": validation_fraction,
                  "documents": held.documents, "tokens": split.total_tokens}
    result = manifest(shards, train.documents, record)
    result.save(out)
    return result
