from __future__ import annotations

import dataclasses
import gzip
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zstandard

from data_pipeline.badinput import BadInput, DataError
from data_pipeline.documents import iter_documents
from data_pipeline.loader import IGNORE_INDEX, StreamingData
from data_pipeline.mixture import Mixture
from data_pipeline.shards import Manifest, tokenize_to_shards
from data_pipeline.tokenizer import load_tokenizer, train_bpe
from tests.conftest import ROOT, tiny_config


def _documents(n: int = 120) -> list[str]:
    """Real sentences from the bundled text, regrouped into n varied documents."""
    words = (ROOT / "data/sample.txt").read_text().split()
    rng = np.random.default_rng(0)
    docs = []
    for i in range(n):
        start = int(rng.integers(0, len(words) - 80))
        docs.append(f"[{i}] " + " ".join(words[start:start + int(rng.integers(5, 70))]))
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    docs = _documents()
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe(docs, 320, root / "tok.json")
    manifest = tokenize_to_shards([str(jsonl)], root / "shards", root / "tok.json",
                                  shard_tokens=480, chunk_tokens=96, progress=False)
    return {"root": root, "docs": docs, "jsonl": jsonl, "tok": root / "tok.json",
            "shards": root / "shards", "manifest": manifest}


def _cfg(corpus, *overrides, shards=None):
    shards = shards or corpus["shards"]
    return tiny_config("data.source=shards", f"data.sources=[{{path: {shards}}}]",
                       f"data.tokenizer={corpus['tok']}", "model.vocab_size=320",
                       "train.seq_len=31", "train.micro_batch_size=2", "train.grad_accum_steps=2",
                       "data.shuffle_buffer=8", *overrides)


def _global_batches(corpus, steps, dp, workers, *overrides, state=None, micro=None, shards=None):
    """Run dp loaders (one per rank) for `steps` steps; returns per-step {global index: row}."""
    mbs = micro or 4 // dp
    cfg = _cfg(corpus, f"train.micro_batch_size={mbs}", "train.grad_accum_steps=2",
               f"data.num_workers={workers}", *overrides, shards=shards)
    out = [dict() for _ in range(steps)]
    datas = []
    for rank in range(dp):
        data = StreamingData(cfg, dp_rank=rank, dp_size=dp)
        if state:
            data.load_state_dict(state)
        start = data.samples_consumed
        it = data.batches()
        for k in range(steps * 2):
            inputs, labels = next(it)
            for g, x, y in zip(data.spec.samples(start, k), inputs, labels, strict=True):
                out[k // 2][g] = torch.cat((x[:1], y)).tolist() if y[0] != IGNORE_INDEX else None
        datas.append(data)
    return out, datas


def test_round_trip_reproduces_the_documents(corpus):
    """Unshuffled, the loader's windows are the token stream: detokenised between EOS tokens
    they give back every document."""
    tok = load_tokenizer(corpus["tok"])
    eos = corpus["manifest"].eos_id
    n = corpus["manifest"].total_tokens // 32
    batches, _ = _global_batches(corpus, n // 8, 1, 0, "data.shuffle=false")
    rows = [r for step in batches for _, r in sorted(step.items())]
    stream = [t for r in rows for t in r]
    text = [tok.decode(list(g)) for g in _split(stream, eos)]
    whole = len(text) - 1  # the last document may run past the last full window
    assert text[:whole] == corpus["docs"][:whole]
    assert corpus["docs"][whole].startswith(text[whole])
    assert whole > 100


def _split(stream, eos):
    doc = []
    for t in stream:
        if t == eos:
            yield doc
            doc = []
        else:
            doc.append(t)
    yield doc


@pytest.mark.parametrize("dp", [1, 2, 4])
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_partition_and_independence_of_layout(corpus, dp, workers):
    """One epoch over DP ranks x workers: every global sample appears once, the same as on one
    process, and the epoch's samples use every token of the corpus exactly once (but the tail)."""
    per_epoch = corpus["manifest"].total_tokens // 32
    steps = per_epoch // 8
    got, _ = _global_batches(corpus, steps, dp, workers)
    want, _ = _global_batches(corpus, steps, 1, 0) if (dp, workers) != (1, 0) else (got, None)
    assert got == want
    flat = {g: r for step in got for g, r in step.items()}
    assert sorted(flat) == list(range(steps * 8))
    # token-level check against the shards themselves: nothing dropped, nothing repeated
    full, _ = _global_batches(corpus, per_epoch // 8 + 1, 1, 0, "train.seed=5")
    epoch = [r for step in full for g, r in sorted(step.items()) if g < per_epoch]
    corpus_tokens = Counter(_all_tokens(corpus["shards"]))
    used = Counter(t for r in epoch for t in r)
    assert not used - corpus_tokens
    assert sum((corpus_tokens - used).values()) == corpus["manifest"].total_tokens - per_epoch * 32


def _all_tokens(shards: Path) -> list[int]:
    """Read every shard with the tar module (not webdataset): an independent reference."""
    import tarfile

    out = []
    for s in Manifest.load(shards).shards:
        with tarfile.open(shards / s.name) as tar:
            for m in tar.getmembers():
                out.extend(np.frombuffer(tar.extractfile(m).read(), dtype=np.uint16).tolist())
    return out


@pytest.mark.parametrize("new_dp", [1, 4])
def test_resume_with_another_data_parallel_size(corpus, new_dp):
    uninterrupted, _ = _global_batches(corpus, 9, 1, 0)
    first, datas = _global_batches(corpus, 4, 2, 2)
    assert first == uninterrupted[:4]
    state = datas[0].state_dict()
    assert state["samples_consumed"] == 4 * 8
    resumed, _ = _global_batches(corpus, 5, new_dp, 2, state=state)
    assert resumed == uninterrupted[4:]


def test_state_refuses_a_different_data_setup(corpus):
    _, datas = _global_batches(corpus, 1, 1, 0)
    other = StreamingData(_cfg(corpus, "train.seq_len=15"))
    with pytest.raises(DataError, match="'seq_len' differs"):
        other.load_state_dict(datas[0].state_dict())


def test_mixture_proportions_exact_and_deterministic():
    mix = Mixture([0.5, 0.3, 0.2], window=1000)
    counts = Counter(mix.locate(g)[0] for g in range(10_000))
    for i, w in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[i] / 10_000 - w) < 0.01
    odd = Mixture([1, 1, 1], window=100)
    assert [Counter(odd.locate(g)[0] for g in range(w * 100, (w + 1) * 100)) for w in range(3)] \
        == [Counter({0: 34, 1: 33, 2: 33})] * 3
    per_source = {i: [mix.locate(g)[1] for g in range(10_000) if mix.locate(g)[0] == i]
                  for i in range(3)}
    for i, idx in per_source.items():
        assert idx == list(range(counts[i]))  # every source read in order, no gaps
    assert [Mixture([0.5, 0.3, 0.2], 1000).locate(g) for g in range(500)] == \
        [mix.locate(g) for g in range(500)]


def test_two_source_loader_follows_the_mixture(corpus, tmp_path):
    """With two sources, global sample g is sample `idx` of source `i` as the mixture says,
    read through an independent ShardSource; and two runs agree."""
    from data_pipeline.stream import ShardSource

    second = tmp_path / "second"
    tokenize_to_shards([str(corpus["jsonl"])], second, corpus["tok"], shard_tokens=960,
                       chunk_tokens=64, progress=False)
    cfg = _cfg(corpus, "data.mixture_window=4", "data.num_workers=2",
               f"data.sources=[{{path: {corpus['shards']}, weight: 1}}, {{path: {second}, weight: 3}}]")
    runs = []
    for _ in range(2):
        it = StreamingData(cfg).batches()
        runs.append([next(it) for _ in range(6)])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*runs, strict=True))
    mix = Mixture([1, 3], 4)
    sources = [ShardSource(str(p), 31, cfg.train.seed, i, True, 8, BadInput())
               for i, p in enumerate((corpus["shards"], second))]
    rows = torch.cat([torch.cat((x[:, :1], y), 1) for x, y in runs[0]])
    for g, row in enumerate(rows):
        i, idx = mix.locate(g)
        assert row.tolist() == sources[i].sample(idx).tolist()
    assert Counter(mix.locate(g)[0] for g in range(len(rows))) == {0: 3, 1: 9}


def _damaged(corpus, tmp_path, how, victim="shard-000001.tar"):
    d = tmp_path / how
    if not d.exists():
        shutil.copytree(corpus["shards"], d)
    victim = d / victim
    if how == "truncated":
        victim.write_bytes(victim.read_bytes()[:1000])
    elif how == "corrupt":
        data = bytearray(victim.read_bytes())
        data[512 * 3:512 * 6] = b"\xff" * (512 * 3)
        victim.write_bytes(bytes(data))
    elif how == "empty":
        victim.write_bytes(b"")
    elif how == "missing":
        victim.unlink()
    return d


@pytest.mark.parametrize("how", ["truncated", "corrupt", "empty", "missing"])
def test_bad_shards_raise_or_are_counted(corpus, tmp_path, how):
    d = _damaged(corpus, tmp_path, how)
    steps = corpus["manifest"].total_tokens // 32 // 8
    with pytest.raises(DataError, match=r"shard .*shard-000001\.tar: .* at token \d+ of 480"):
        _global_batches(corpus, steps, 1, 2, shards=d)
    good, _ = _global_batches(corpus, steps, 1, 0)
    got, datas = _global_batches(corpus, steps, 1, 2, "data.on_error=skip", shards=d)
    holes = [g for step in got for g, r in step.items() if r is None]
    assert holes and datas[0].skipped_samples == len(holes)
    for step_good, step_got in zip(good, got, strict=True):  # everything else is unchanged
        assert {g: r for g, r in step_got.items() if r is not None} == \
            {g: r for g, r in step_good.items() if g not in holes}


def test_tokenize_bad_documents(tmp_path, corpus):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": ""}\n{"text": "caf\xe9"}\n{"nope": 1}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: empty document"):
        tokenize_to_shards([str(src)], tmp_path / "a", corpus["tok"], progress=False,
                           empty="error")
    with pytest.raises(DataError, match=r"bad.jsonl:3: not UTF-8"):  # the empty one: skipped
        tokenize_to_shards([str(src)], tmp_path / "a2", corpus["tok"], progress=False)
    m = tokenize_to_shards([str(src)], tmp_path / "b", corpus["tok"], on_error="skip",
                           progress=False)
    assert m.documents == 1 and m.skipped == {"empty documents": 1, "documents": 3}
    assert m.inputs == [{"path": str(src), "documents": 1, "tokens": m.total_tokens,
                         "skipped": {"empty documents": 1, "documents": 3}}]
    for line, msg in ((3, "not UTF-8 (byte 13)"), (4, "no string field 'text'"),
                      (5, "invalid JSON")):
        bad = BadInput("raise")
        lines = src.read_bytes().splitlines(keepends=True)
        one = tmp_path / f"l{line}.jsonl"
        one.write_bytes(lines[line - 1])
        with pytest.raises(DataError, match=re.escape(f"l{line}.jsonl:1: {msg}")):
            list(iter_documents([str(one)], bad))
    with pytest.raises(DataError, match="input not found"):
        tokenize_to_shards([str(tmp_path / "none.txt")], tmp_path / "c", corpus["tok"])


def test_tokenizer_manifest_mismatch(corpus, tmp_path):
    other = tmp_path / "other.json"
    train_bpe(corpus["docs"][:50], 300, other)
    with pytest.raises(DataError, match="manifest tokenizer hash .* does not match data.tokenizer"):
        StreamingData(_cfg(corpus, f"data.tokenizer={other}"))
    with pytest.raises(DataError, match="vocabulary of 320 exceeds model.vocab_size 300"):
        StreamingData(_cfg(corpus, "model.vocab_size=300"))
    with pytest.raises(DataError, match="manifest not found"):
        StreamingData(_cfg(corpus, shards=tmp_path))


def same_output(a: Manifest, b: Manifest) -> bool:
    """Equal manifests but for the input files' names (per-input counts must agree)."""
    def strip(m):
        return dataclasses.replace(m, inputs=[{k: v for k, v in r.items() if k != "path"}
                                              for r in m.inputs])
    return strip(a) == strip(b)


def test_compressed_inputs_and_workers_give_identical_shards(corpus, tmp_path):
    gz = tmp_path / "docs.jsonl.gz"
    gz.write_bytes(gzip.compress(corpus["jsonl"].read_bytes()))
    zst = tmp_path / "docs.jsonl.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress(corpus["jsonl"].read_bytes()))
    outs = [tokenize_to_shards([str(src)], tmp_path / f"o{i}", corpus["tok"], shard_tokens=480,
                               chunk_tokens=96, workers=w, progress=False)
            for i, (src, w) in enumerate(((gz, 1), (zst, 2)))]
    assert same_output(outs[0], outs[1]) and same_output(outs[1], corpus["manifest"])
    assert _all_tokens(tmp_path / "o1") == _all_tokens(corpus["shards"])


def test_pipe_urls_are_read(corpus):
    shards = corpus["shards"]
    got, _ = _global_batches(corpus, 3, 1, 0)
    cfg_piped, _ = _global_batches(corpus, 3, 1, 0, f"data.sources=[{{path: {shards}, "
                                   f"url_template: 'pipe:cat {{dir}}/{{shard}}'}}]")
    assert got == cfg_piped


def test_trainer_on_shards_logs_data_skips(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pretrain.train import Trainer

    for i in range(0, 30, 3):
        d = _damaged(corpus, tmp_path, "truncated", f"shard-{i:06d}.tar")
    cfg = _cfg(corpus, "data.on_error=skip", "train.max_steps=12", "train.log_every=4",
               "optim.warmup_steps=0", f"train.out_dir={tmp_path / 'run'}", shards=d)
    lines = []
    summary = Trainer(cfg, log=lines.append).fit(save=False)
    assert summary.history[-1]["data/skipped_samples"] > 0
    step_lines = [line for line in lines if line.startswith("step")]
    skips = summary.history[-1]["data/skipped_samples"]
    assert f"{skips:.0f} samples" in step_lines[-1]
    assert f"skipped samples     {skips:.0f}" in lines[-1]  # the summary
    events = EventAccumulator(str(summary.tensorboard_dir))
    events.Reload()
    assert events.Scalars("data/skipped_samples")[-1].value == summary.history[-1]["data/skipped_samples"]
