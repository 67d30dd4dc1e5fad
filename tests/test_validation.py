"""Held-out validation: the document-level split, the same tokens and numbers under any
layout, the val/ metrics in every output, and what `pretrain eval` says it measured."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from data_pipeline.shards import Manifest, held_out, tokenize_to_shards
from data_pipeline.stream import ShardSource
from data_pipeline.tokenizer import load_tokenizer, train_bpe
from pretrain.callbacks import Callback
from pretrain.callbacks.validation import Validation
from pretrain.cli import main
from pretrain.data import heldout_data
from pretrain.train import Trainer
from tests.conftest import ROOT, tiny_config
from tests.distributed import torchrun
from tests.multiproc.val_equivalence import SHAPE


def _documents(tokenizer, directory) -> list[str]:
    """Every document of a shard directory, decoded (split at EOS)."""
    m = Manifest.load(directory)
    src = ShardSource(str(directory), 7, 0, 0, False, 1 << 20, None)
    ids = src._read(0, 0, m.total_tokens)
    docs, start = [], 0
    for end in np.flatnonzero(ids == m.eos_id):
        docs.append(tokenizer.decode(ids[start:end].tolist()))
        start = end + 1
    return docs


def test_document_split_is_disjoint_and_recorded(tmp_path):
    words = (ROOT / "data/sample.txt").read_text().split()
    docs = [f"document {i}: " + " ".join(words[i * 7:i * 7 + 20]) for i in range(120)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_bpe(docs, 300, tmp_path / "tok.json")
    m = tokenize_to_shards([str(tmp_path / "docs.jsonl")], tmp_path / "shards", tmp_path / "tok.json",
                           shard_tokens=512, chunk_tokens=64, progress=False,
                           validation_fraction=0.25)
    tok = load_tokenizer(tmp_path / "tok.json")
    train_docs = _documents(tok, tmp_path / "shards")
    val_docs = _documents(tok, tmp_path / "shards/validation")
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(docs)  # nothing lost
    assert set(val_docs) == {d for d in docs if held_out(d, 0.25)}
    assert 15 < len(val_docs) < 45
    assert m.validation == {"path": "validation", "fraction": 0.25, "documents": len(val_docs),
                            "tokens": Manifest.load(tmp_path / "shards/validation").total_tokens}
    assert m.documents == len(train_docs)


def test_heldout_rank_batches_cover_the_same_samples_on_any_layout():
    held = heldout_data(tiny_config())
    one = held.rank_batches(20 * 64, 3, 0, 1)
    two = [held.rank_batches(20 * 64, 3, r, 2) for r in range(2)]
    def rows(batches):
        return [tuple(x.tolist()) for b in batches for x in b[1] if (x >= 0).any()]

    assert sorted(rows(one)) == sorted(rows(two[0]) + rows(two[1]))
    assert len(rows(one)) == 20


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", [["parallel.data=2"], ["parallel.pipeline=2"]])
def test_validation_equals_one_process(tmp_path, layout):
    torchrun(2, "-m", "tests.multiproc.val_equivalence", "--out", str(tmp_path / "par.json"),
             *layout)
    cfg = tiny_config(*SHAPE, out_dir=tmp_path / "ref")
    ref = Validation(1).evaluate(Trainer(cfg, log=None, tensorboard=False))
    par = json.loads((tmp_path / "par.json").read_text())
    assert set(par) == set(ref) and ref["val/tokens"] == 1600 - 1600 % 64
    for key, value in ref.items():
        # per-token CE equal to fp32 rounding, summed in float64 over another grouping
        assert par[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


class Collect(Callback):
    """A logger in a few lines: every metric it is handed."""

    name = "collect"

    def __init__(self):
        self.seen: dict[int, dict[str, float]] = {}

    def on_log(self, trainer, step, metrics):
        self.seen.setdefault(step, {}).update(metrics)


def test_a_new_logger_receives_every_metric(tmp_path):
    logger = Collect()
    cfg = tiny_config("train.max_steps=4", "optim.warmup_steps=1", "train.log_every=2", "train.eval_every=2",
                      "train.eval_tokens=640", out_dir=tmp_path)
    Trainer(cfg, log=None, tensorboard=False, callbacks=[logger]).fit(save=False)
    written: dict[int, dict] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        written.setdefault(row.pop("step"), {}).update(row)
    for step in (2, 4):
        assert logger.seen[step] == {k: v for k, v in written[step].items() if k != "time"}
        loops = cfg.model.loops
        assert {"val/loss", *(f"val/ce_step{t}" for t in range(1, loops + 1)),
                "val/ce_exit_gate:0.5", "val/loops_exit_gate:0.9", "train/loss"} <= set(logger.seen[step])


def test_eval_says_which_data_it_measured(tmp_path, capsys):
    cfg_args = ["--config", str(ROOT / "configs/tiny.yaml"), f"train.out_dir={tmp_path}",
                f"data.paths=[{ROOT / 'data/sample.txt'}]", "train.max_steps=2", "optim.warmup_steps=1"]
    assert main(["train", *cfg_args, f"data.validation=[{{path: {ROOT / 'data/validation.txt'}}}]"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path), "--batches", "1", "--exit", "all"]) == 0
    out = capsys.readouterr().out
    # 2,854 bytes of text, 1 EOS: 44 sequences of 64 + 1 tokens; one micro-batch holds 16
    assert (f"data: validation data ({ROOT / 'data/validation.txt'}): the first 16 of 44 "
            "sequences (36.4%; --batches takes more)") in out
    assert main(["eval", "--checkpoint", str(tmp_path), "--batches", "3", "--exit", "all"]) == 0
    assert f"data: validation data ({ROOT / 'data/validation.txt'}): all\n" in capsys.readouterr().out
    assert main(["train", *cfg_args, f"train.out_dir={tmp_path}/b", "data.validation=[]"]) == 0
    capsys.readouterr()
    assert main(["eval", "--checkpoint", f"{tmp_path}/b", "--batches", "1", "--exit", "all"]) == 0
    assert "data: TRAINING data (no data.validation configured" in capsys.readouterr().out


def test_wandb_logger_offline(tmp_path, monkeypatch):
    """train.wandb_project adds the W&B callback; offline, the W&B run holds every metric
    the other outputs get, and its id is kept in the checkpoint for a resumed job."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_config("train.max_steps=2", "optim.warmup_steps=1", "train.log_every=1",
                      "train.eval_every=2", "train.eval_tokens=640",
                      "train.wandb_project=looped-test", out_dir=tmp_path)

    class Check(Callback):  # runs after the W&B callback: what reached the W&B run's log
        def __init__(self):
            self.sent, self.checked = [], 0

        def on_fit_start(self, trainer):
            real = wandb_cb.run.log
            wandb_cb.run.log = lambda data, step: (self.sent.append((step, data)),
                                                   real(data, step=step))

        def on_log(self, trainer, step, metrics):
            assert self.sent[-1] == (step, metrics)
            self.checked += 1

    check = Check()
    trainer = Trainer(cfg, log=None, tensorboard=False, callbacks=[check])
    (wandb_cb,) = [cb for cb in trainer.callbacks if cb.name == "wandb"]
    trainer.fit()
    assert check.checked == 3  # steps 1 and 2, and the validation pass at step 2
    run_id = wandb_cb.state_dict()["run_id"]
    assert (next((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")) / f"run-{run_id}.wandb").stat().st_size
    meta = json.loads(next(tmp_path.glob("checkpoints/step_*/meta.json")).read_text())
    assert meta["trainer"]["callbacks"]["wandb"] == {"run_id": run_id, "run_dir": str(tmp_path.resolve())}


def test_wandb_continues_only_its_own_run_and_uploads_no_url_template(tmp_path, monkeypatch):
    """Issue 25 item 9: a checkpoint's W&B run id is used only by a job in the same run
    directory (resuming a colleague's checkpoint starts a run of one's own), and the uploaded
    config carries no url_template (it may hold a credential)."""
    from pretrain.callbacks.wandb import REDACTED, WandB

    calls = []

    def init(**kw):
        calls.append(kw)
        return SimpleNamespace(id=kw["id"] or f"new{len(calls)}", finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    tree = {"data": {"sources": [{"path": "/c", "url_template": "pipe:curl -H 'token: SECRET' {shard}"}],
                     "validation": [{"path": "/v", "url_template": ""}]}}
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"

    def job(out_dir, state):
        cb = WandB("p")
        cb.load_state_dict(state)
        cb.on_fit_start(SimpleNamespace(topo=SimpleNamespace(is_main=True), out_dir=out_dir,
                                        cfg=SimpleNamespace(to_dict=lambda: tree)))
        return cb.state_dict()

    first = job(mine, {})
    assert first == {"run_id": "new1", "run_dir": str(mine.resolve())}
    assert job(mine, first)["run_id"] == "new1"  # requeued: the same W&B run
    assert job(theirs, first)["run_id"] == "new3"  # someone else's checkpoint: a run of its own
    assert all(c["config"]["data"]["sources"][0]["url_template"] == REDACTED for c in calls)
    assert "SECRET" not in repr(calls) and tree["data"]["sources"][0]["url_template"].startswith("pipe:")
