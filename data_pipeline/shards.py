"""Tokenise documents into webdataset tar shards of fixed-size token chunks, plus a manifest.

Documents are tokenised in order (optionally by a process pool, which preserves order, so the
output does not depend on --workers), each followed by EOS, and the concatenated stream is cut
into chunks of `chunk_tokens` (the last may be shorter: nothing is dropped). Every shard holds
`shard_tokens // chunk_tokens` chunks as tar members `KEY.tok` (raw little-endian uint16, or
uint32 when the vocabulary does not fit). `manifest.json`, written last and atomically, lists
the shards with their token counts, the dtype, vocabulary size, EOS id and the tokenizer's hash.
"""

from __future__ import annotations

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
                   skipped=raw.get("skipped", {}))


_worker_tokenizer = None


def _init_worker(path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(path)


def _encode(batch: list[str]) -> list[list[int]]:
    return [e.ids for e in _worker_tokenizer.encode_batch(batch, add_special_tokens=False)]


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
) -> Manifest:
    from tqdm import tqdm

    if chunk_tokens < 1 or shard_tokens < chunk_tokens:
        raise DataError(f"--shard-tokens ({shard_tokens}) must be >= --chunk-tokens ({chunk_tokens}) >= 1")
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
    chunks: list[int] = []  # token count of every chunk written, in order
    pending = np.empty(0, dtype=dtype)
    names: list[str] = []
    pool = None
    if workers > 1:
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (str(tokenizer_path),))
        encoded = pool.imap(_encode, _batches(docs, 64), chunksize=4)
    else:
        _init_worker(str(tokenizer_path))
        encoded = map(_encode, _batches(docs, 64))
    bar = tqdm(unit=" docs", desc=f"tokenizing -> {out}", disable=None if progress else True,
               mininterval=1.0)
    writer = wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=per_shard, maxsize=1 << 62,
                             verbose=0, post=lambda fname: names.append(Path(fname).name))

    def emit(chunk: np.ndarray) -> None:
        writer.write({"__key__": f"{len(chunks):010d}", SUFFIX: chunk.tobytes()})
        chunks.append(len(chunk))

    documents = 0
    try:
        for batch in encoded:
            flat: list[int] = []
            for doc in batch:
                flat.extend(doc)
                flat.append(eos)
            ids = np.array(flat, dtype=dtype)
            documents += len(batch)
            bar.update(len(batch))
            pending = np.concatenate((pending, ids))
            full = len(pending) // chunk_tokens * chunk_tokens
            for start in range(0, full, chunk_tokens):
                emit(pending[start:start + chunk_tokens])
            pending = pending[full:]
        if len(pending):
            emit(pending)
    finally:
        writer.close()
        bar.close()
        if pool is not None:
            pool.terminate()
    if not chunks:
        raise DataError(f"{', '.join(inputs)}: no documents to tokenize")
    shards = [ShardInfo(name, sum(chunks[i * per_shard:(i + 1) * per_shard]),
                        len(chunks[i * per_shard:(i + 1) * per_shard]))
              for i, name in enumerate(names)]
    manifest = Manifest(shards=shards, dtype=np.dtype(dtype).name, vocab_size=vocab, eos_id=eos,
                        tokenizer_sha256=tokenizer_hash(tok), chunk_tokens=chunk_tokens,
                        documents=documents, skipped=dict(bad.counts))
    manifest.save(out)
    return manifest
