"""Corpora as users have them: Parquet and saved Arrow datasets token for token equal to JSON
lines, globs and pipe: inputs, empty documents skipped and counted, bad columnar input named,
a tokenizer trained on a sample, and the job-array parts merged into the single-process shards
(SLURM itself: tests/test_slurm.py)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.badinput import BadInput, DataError
from data_pipeline.documents import iter_documents
from data_pipeline.inputs import Unit, expand_inputs, split_parts, units_of
from data_pipeline.parts import merge_parts, part_dir, plan_job, tokenize_part
from data_pipeline.shards import Manifest, Tokenizing, tokenize_to_shards
from data_pipeline.stream import ShardSource
from data_pipeline.tokenizer import train_bpe
from tests.conftest import ROOT

SETTINGS = {"shard_tokens": 2048, "chunk_tokens": 256}


def _tokens(directory) -> list[int]:
    m = Manifest.load(directory)
    return ShardSource(str(directory), 0, 0, 0, False, 1 << 20, None)._read(0, 0, m.total_tokens).tolist()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = [p for p in (ROOT / "data/sample.txt").read_text().split("\n\n") if p.strip()]
    docs = [f"{i}: {p} ünïcode" for i, p in enumerate(paragraphs * 4)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe(docs, 400, root / "tok.json")
    return {"root": root, "docs": docs, "tok": root / "tok.json"}


def _jsonl_reference(corpus, tmp_path):
    return tokenize_to_shards([str(corpus["root"] / "docs.jsonl")], tmp_path / "ref", corpus["tok"],
                              progress=False, **SETTINGS)


def test_parquet_and_arrow_give_the_jsonl_shards_token_for_token(corpus, tmp_path):
    import datasets

    docs = corpus["docs"]
    half = len(docs) // 2
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"id": list(range(half)), "content": docs[:half]}),
                   tmp_path / "pq/part-0.parquet", row_group_size=7)
    pq.write_table(pa.table({"id": list(range(half, len(docs))), "content": docs[half:]}),
                   tmp_path / "pq/part-1.parquet", row_group_size=11)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "arrow"))
    ref = _jsonl_reference(corpus, tmp_path)
    got_pq = tokenize_to_shards([str(tmp_path / "pq")], tmp_path / "o_pq", corpus["tok"],
                                text_field="content", progress=False, **SETTINGS)
    got_arrow = tokenize_to_shards([str(tmp_path / "arrow")], tmp_path / "o_arrow", corpus["tok"],
                                   progress=False, **SETTINGS)
    want = _tokens(tmp_path / "ref")
    for m, out in ((got_pq, "o_pq"), (got_arrow, "o_arrow")):
        assert _tokens(tmp_path / out) == want
        assert (m.documents, m.total_tokens, [s.tokens for s in m.shards]) == \
               (ref.documents, ref.total_tokens, [s.tokens for s in ref.shards])
    assert [r["documents"] for r in got_pq.inputs] == [half, len(docs) - half]
    assert sum(r["tokens"] for r in got_pq.inputs) == ref.total_tokens
    row_groups = -(-half // 7) + -(-(len(docs) - half) // 11)
    assert len(units_of(expand_inputs([str(tmp_path / "pq")]))) == row_groups


def test_globs_gzip_and_pipe_inputs_read_the_same_documents(corpus, tmp_path):
    lines = (corpus["root"] / "docs.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:30]))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress("".join(lines[30:]).encode()))
    bad = BadInput()
    assert list(iter_documents([str(tmp_path / "*.json*")], bad)) == corpus["docs"]
    piped = f"pipe:cat {tmp_path / 'b.jsonl.gz'}"
    assert list(iter_documents([str(tmp_path / "a.jsonl"), piped], bad)) == corpus["docs"]
    with pytest.raises(DataError, match=r"nothing\*\.parquet: no input matches"):
        expand_inputs([str(tmp_path / "nothing*.parquet")])
    with pytest.raises(DataError, match="exited with status"):
        list(iter_documents(["pipe:false x.jsonl"], bad))


def test_empty_documents_are_skipped_and_counted(corpus, tmp_path, capsys):
    """A source tree as JSON lines and as files: an empty __init__.py is normal, not an error."""
    from pretrain.cli import main

    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg/__init__.py").write_text("")
    (src / "pkg/mod.py").write_text("def f():\n    return 1\n")
    (src / "pkg/blank.py").write_text("\n  \n")
    m = tokenize_to_shards([str(src)], tmp_path / "o", corpus["tok"], progress=False, **SETTINGS)
    assert m.documents == 1 and m.skipped == {"empty documents": 2}
    assert [(r["path"].split("/")[-1], r["documents"], r["skipped"]) for r in m.inputs] == [
        ("__init__.py", 0, {"empty documents": 1}), ("blank.py", 0, {"empty documents": 1}),
        ("mod.py", 1, {})]
    with pytest.raises(DataError, match=r"__init__.py: empty document"):
        tokenize_to_shards([str(src)], tmp_path / "o2", corpus["tok"], empty="error",
                           progress=False)
    assert main(["data", "train-tokenizer", "--input", str(src), "--vocab-size", "280",
                 "--output", str(tmp_path / "t.json")]) == 0
    assert "skipped: 2 empty documents" in capsys.readouterr().out


def _write_bad_parquet(tmp_path):
    pq.write_table(pa.table({"text": ["fine one", "fine two", None, "fine three"]}),
                   tmp_path / "good.parquet", row_group_size=2)
    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "ints.parquet")
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nofield.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 this is not parquet at all")


@pytest.mark.parametrize("name, message", [
    ("garbage.parquet", r"garbage.parquet: not a readable Parquet file"),
    ("ints.parquet", r"ints.parquet row group 0: column 'text' is int64, not text"),
    ("nofield.parquet", r"nofield.parquet: no column 'text' \(columns: body; pass --text-field\)"),
    ("good.parquet", r"good.parquet row group 1 row 0: 'text' is null")])
def test_bad_columnar_input_is_named_or_counted(corpus, tmp_path, name, message):
    _write_bad_parquet(tmp_path)
    with pytest.raises(DataError, match=message):
        tokenize_to_shards([str(tmp_path / name)], tmp_path / "o", corpus["tok"], progress=False)
    inputs = [str(tmp_path / "good.parquet")] + ([str(tmp_path / name)] if name != "good.parquet"
                                                 else [])
    m = tokenize_to_shards(inputs, tmp_path / "s", corpus["tok"], on_error="skip", progress=False)
    if name == "garbage.parquet":  # its footer is read while planning: the file is skipped
        assert m.skipped == {"files": 1, "documents": 1} and m.documents == 3
        assert m.inputs[-1] == {"path": inputs[1], "documents": 0, "tokens": 0,
                                "skipped": {"files": 1}}
        return
    skipped = {"ints.parquet": 3, "nofield.parquet": 2, "good.parquet": 0}[name] + 1
    assert m.skipped == {"documents": skipped} and m.documents == 3


@pytest.mark.multiproc
def test_bad_parquet_from_the_cli_is_one_line_exit_2(corpus, tmp_path):
    _write_bad_parquet(tmp_path)
    p = subprocess.run([sys.executable, "-m", "pretrain.cli", "data", "tokenize", "--input",
                        str(tmp_path / "ints.parquet"), "--tokenizer", str(corpus["tok"]),
                        "--output", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"pretrain: error: {tmp_path / 'ints.parquet'} row group 0: column 'text' is int64, not text"]


def test_tokenizer_on_a_sample_reads_a_share_of_every_input(corpus, tmp_path):
    docs = corpus["docs"]
    for i in range(4):
        (tmp_path / f"{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n"
                                                     for d in docs[i::4]))
    bad = BadInput()
    inputs = [str(tmp_path / "*.jsonl")]
    sample = list(iter_documents(inputs, bad, sample_bytes=4000))
    assert sample == list(iter_documents(inputs, bad, sample_bytes=4000))  # deterministic
    everything = list(iter_documents(inputs, bad))
    assert 4000 <= sum(map(len, sample)) < 4000 + 4 * max(map(len, docs))
    firsts = {docs[i] for i in range(4)}  # every input contributes its first documents
    assert firsts <= set(sample) and len(sample) < len(everything) / 3


def test_split_parts_is_contiguous_and_balanced():
    units = [Unit(f"f{i}", "jsonl", bytes=b) for i, b in enumerate([5, 5, 5, 5, 40, 5, 5, 30])]
    parts = split_parts(units, 3)
    assert [i for p in parts for i in p] == list(range(8))
    assert [sum(units[i].bytes for i in p) for p in parts] == [20, 45, 35]  # each unit where its middle falls
    assert split_parts(units[:2], 4) == [[], [0], [], [1]]


def test_job_parts_merge_into_the_single_process_shards(corpus, tmp_path):
    """Three parts over JSON lines, Parquet row groups and a text file, run one by one (as an
    array's tasks would), merge to the single run's shards and manifest; a damaged finished
    part is redone, an intact one skipped; another plan in the same directory is refused."""
    docs = corpus["docs"]
    pq.write_table(pa.table({"text": docs[:50]}), tmp_path / "a.parquet", row_group_size=9)
    (tmp_path / "b.txt").write_text("a whole text file is one document\n")
    inputs = [str(tmp_path / "a.parquet"), str(corpus["root"] / "docs.jsonl"), str(tmp_path / "b.txt")]
    how = Tokenizing(str(corpus["tok"]), validation_fraction=0.2, **SETTINGS)
    single = tokenize_to_shards(inputs, tmp_path / "single", corpus["tok"], progress=False,
                                validation_fraction=0.2, **SETTINGS)
    out = tmp_path / "job"
    plan = plan_job(inputs, out, how, 3)
    assert all(plan["parts"])
    said = [tokenize_part(out, k) for k in range(3)]
    assert "skipped" not in " ".join(said)
    train_bin = part_dir(out, 1) / "train.bin"
    damaged = bytearray(train_bin.read_bytes())
    damaged[0] ^= 1
    train_bin.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"parts 1 of 3 not done"):
        merge_parts(out)
    assert "skipped" in tokenize_part(out, 0) and "skipped" not in tokenize_part(out, 1)
    with pytest.raises(DataError, match="a plan for other inputs or settings"):
        plan_job(inputs[:2], out, how, 3)
    merged = merge_parts(out)
    assert merged == single
    assert _tokens(out) == _tokens(tmp_path / "single")
    assert _tokens(out / "validation") == _tokens(tmp_path / "single/validation")
    assert not list((out / "parts").glob("*/*.bin")) and (out / "parts/plan.json").is_file()
    assert np.sum([r["documents"] for r in merged.inputs]) == merged.documents + merged.validation[
        "documents"]


def test_parts_count_an_unreadable_file_as_one_process_does(corpus, tmp_path):
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not parquet")
    inputs = [str(corpus["root"] / "docs.jsonl"), str(tmp_path / "garbage.parquet")]
    single = tokenize_to_shards(inputs, tmp_path / "single", corpus["tok"], progress=False,
                                on_error="skip", **SETTINGS)
    out = tmp_path / "job"
    plan_job(inputs, out, Tokenizing(str(corpus["tok"]), on_error="skip", **SETTINGS), 2)
    for k in range(2):
        tokenize_part(out, k)
    assert merge_parts(out) == single and single.skipped == {"files": 1}
