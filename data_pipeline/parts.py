"""Tokenisation as a job array: N parts tokenised on their own, merged into exactly the shards
one process writes.

  plan   OUT/parts/plan.json: the inputs' units (inputs.py) split into N contiguous parts
         balanced by bytes, and the settings. Written once; a rerun with other inputs or
         settings is refused (it would mix two corpora).
  part   OUT/parts/part-0000k/: the token stream of its documents (train.bin, validation.bin:
         raw ids in the manifest's dtype, EOS after each document) and part.json, written last:
         documents, skips and per-input counts, each file's size and CRC32. A part whose
         part.json matches its files is done -- a rerun skips it, so a preempted, killed or
         failed task is simply run again.
  merge  the streams in part order through the ShardSink a single run uses: the chunks, shards
         and manifest equal `tokenize_to_shards` over the same inputs (a sink's output depends
         only on the stream). Then the streams go; plan, part records and logs stay.
"""

from __future__ import annotations

import json
import shutil
import zlib
from dataclasses import asdict
from pathlib import Path

import numpy as np

from core.durable import fsync_path
from data_pipeline.badinput import BadInput, DataError
from data_pipeline.inputs import Unit, expand_inputs, split_parts, units_of
from data_pipeline.shards import (
    MANIFEST,
    VALIDATION_DIR,
    InputCounts,
    Manifest,
    ShardSink,
    Tokenizing,
    check_output,
    encode_units,
    write_manifests,
)
from data_pipeline.tokenizer import tokenizer_hash

PARTS, PLAN, DONE = "parts", "plan.json", "part.json"
STREAMS = {"train": "train.bin", "validation": "validation.bin"}
READ_TOKENS = 1 << 22  # tokens per slice when merging


def _write_json(path: Path, body: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    fsync_path(tmp)
    tmp.rename(path)


def plan_job(inputs: list[str], out: Path, how: Tokenizing, tasks: int) -> dict:
    """Write (or find the same) plan of `tasks` parts."""
    how.check()
    if tasks < 1:
        raise DataError(f"--tasks: must be >= 1, got {tasks}")
    check_output(out)
    bad = BadInput(how.on_error)
    units = units_of(expand_inputs(inputs), bad)
    tok = how.vocabulary()[0]
    plan = {"inputs": list(inputs), "settings": asdict(how), "tokenizer_sha256": tokenizer_hash(tok),
            "units": [u.to_dict() for u in units], "parts": split_parts(units, tasks),
            "skipped_files": {path: dict(c) for path, c in bad.by_input.items()}}
    path = out / PARTS / PLAN
    if path.is_file():
        if load_plan(out) != plan:
            raise DataError(f"{path}: a plan for other inputs or settings is there; write to a "
                            "new directory")
        return plan
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, plan)
    return plan


def load_plan(out: Path) -> dict:
    path = out / PARTS / PLAN
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no tokenisation plan (start with `pretrain data tokenize "
                        "--tasks N --submit|--local`)") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON ({e})") from None


def part_dir(out: Path, k: int) -> Path:
    return out / PARTS / f"part-{k:05d}"


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def part_record(out: Path, k: int) -> dict | None:
    """The part's record if it is done: part.json there and every file of the size and CRC32
    it lists; None otherwise."""
    d = part_dir(out, k)
    try:
        record = json.loads((d / DONE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    for name, want in record["files"].items():
        f = d / name
        if not f.is_file() or f.stat().st_size != want["bytes"] or _crc32(f) != want["crc32"]:
            return None
    return record


def tokenize_part(out: Path, k: int) -> str:
    """Tokenise part k of the plan (or find it done); returns what happened, in words."""
    plan = load_plan(out)
    if not 0 <= k < len(plan["parts"]):
        raise DataError(f"part {k}: the plan has parts 0..{len(plan['parts']) - 1}")
    if part_record(out, k) is not None:
        return f"part {k}: done already (size and CRC32 verified), skipped"
    how = Tokenizing(**plan["settings"])
    vocab = how.vocabulary()
    tok, eos, _, dtype = vocab
    if tokenizer_hash(tok) != plan["tokenizer_sha256"]:
        raise DataError(f"{how.tokenizer_path}: changed since the plan was made "
                        f"({out / PARTS / PLAN}); rerun into a new directory")
    units = [Unit(**plan["units"][i]) for i in plan["parts"][k]]
    d = part_dir(out, k)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    bad, counts = BadInput(how.on_error), InputCounts(units)
    docs = {"train": 0, "validation": 0}
    with open(d / STREAMS["train"], "wb") as train, open(d / STREAMS["validation"], "wb") as held:
        for is_held, ids in encode_units(units, how, bad, eos, dtype, counts):
            (held if is_held else train).write(ids.tobytes())
            docs["validation" if is_held else "train"] += 1
    files = {name: {"bytes": (d / name).stat().st_size, "crc32": _crc32(d / name)}
             for name in STREAMS.values()}
    _write_json(d / DONE, {"part": k, "documents": docs, "skipped": dict(bad.counts),
                           "inputs": counts.table(), "files": files})
    tokens = files[STREAMS["train"]]["bytes"] // np.dtype(dtype).itemsize
    return f"part {k}: {docs['train']:,} documents, {tokens:,} tokens ({len(units)} units)"


def _stream(path: Path, dtype):
    size = path.stat().st_size // np.dtype(dtype).itemsize
    if not size:
        return
    tokens = np.memmap(path, dtype=dtype, mode="r", shape=(size,))
    for start in range(0, size, READ_TOKENS):
        yield np.array(tokens[start:start + READ_TOKENS])


def merge_parts(out: Path) -> Manifest:
    """One manifest over every finished part (a part not done is a DataError naming it)."""
    plan = load_plan(out)
    records = [part_record(out, k) for k in range(len(plan["parts"]))]
    missing = [str(k) for k, r in enumerate(records) if r is None]
    if missing:
        raise DataError(f"{out}: parts {', '.join(missing)} of {len(records)} not done (rerun "
                        "them: the same `pretrain data tokenize ... --tasks` skips finished parts)")
    how = Tokenizing(**plan["settings"])
    vocab = how.vocabulary()
    dtype = vocab[3]
    per_shard = how.shard_tokens // how.chunk_tokens
    sinks = {"train": ShardSink(out, dtype, how.chunk_tokens, per_shard),
             "validation": ShardSink(out / VALIDATION_DIR, dtype, how.chunk_tokens, per_shard)}
    skipped: dict[str, int] = {}
    counts = InputCounts([Unit(**u) for u in plan["units"]])
    for counted in plan["skipped_files"].values():  # unreadable files, found while planning
        for kind, n in counted.items():
            skipped[kind] = skipped.get(kind, 0) + n
    for k, record in enumerate(records):
        for split, sink in sinks.items():
            for piece in _stream(part_dir(out, k) / STREAMS[split], dtype):
                sink.add(piece, documents=0)
            sink.documents += record["documents"][split]
        for kind, n in record["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
        for row in record["inputs"]:
            counts.add(row["path"], row["tokens"], row["documents"])
            counts.merge_skips({row["path"]: row["skipped"]})
    counts.merge_skips(plan["skipped_files"])
    shards = {split: sink.close(True) for split, sink in sinks.items()}
    manifest = write_manifests(out, how, vocab, shards["train"], sinks["train"].documents,
                               shards["validation"], sinks["validation"].documents, skipped,
                               counts.table(), ", ".join(plan["inputs"]))
    for k in range(len(records)):  # the streams are in the shards now; the records stay
        for name in STREAMS.values():
            (part_dir(out, k) / name).unlink()
    return manifest


def job_status(out: Path) -> str:
    """Where a tokenisation stands: merged (the manifest), or parts done of the plan."""
    if (out / MANIFEST).is_file():
        m = Manifest.load(out)
        return (f"tokenisation {out}: merged -- {m.documents:,} documents, {m.total_tokens:,} "
                f"tokens in {len(m.shards)} shards")
    plan = load_plan(out)
    records = [part_record(out, k) for k in range(len(plan["parts"]))]
    done = [r for r in records if r is not None]
    pending = [str(k) for k, r in enumerate(records) if r is None]
    units = sum(len(plan["parts"][r["part"]]) for r in done)
    line = (f"tokenisation {out}: {len(done)} of {len(records)} parts done ({units} of "
            f"{len(plan['units'])} units, {sum(r['documents']['train'] for r in done):,} "
            "documents)")
    return line + (f"; not done: parts {', '.join(pending)}" if pending else "; ready to merge")
