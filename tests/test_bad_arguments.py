"""Issue 25 item 10: every bad argument or file is one line on stderr and exit 2 (it was a
traceback, a NaN table, or a silently accepted value); a run shorter than its warmup runs."""

from __future__ import annotations

import contextlib
import io

import pytest
from safetensors.torch import load_file, save_file

from pretrain.cli import main
from tests.conftest import ROOT

TINY = str(ROOT / "configs/tiny.yaml")


def _one_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and all(n in err for n in needles), err
    return err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-step run whose warmup (5) is longer than the run: it runs, and says so."""
    out = tmp_path_factory.mktemp("run")
    log = out.parent / f"{out.name}.log"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["train", "--config", TINY, f"train.out_dir={out}", "train.max_steps=1",
                     f"data.paths=[{ROOT / 'data/sample.txt'}]", "optim.warmup_steps=5",
                     "train.log_every=1"]) == 0
    log.write_text(buf.getvalue())
    return out


def test_a_run_shorter_than_its_warmup_runs_with_a_notice(run):
    printed = (run.parent / f"{run.name}.log").read_text()
    assert "notice: optim.warmup_steps 5 > train.max_steps 1: the run ends inside warmup" in printed
    assert (run / "checkpoints/step_0000001").is_dir()


@pytest.mark.parametrize("args,needles", [
    (["submit", "--config", TINY, "--nodes", "0", "--dry-run"], ["--nodes", "must be >= 1, got 0"]),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--max-new-tokens", "-1"],
     ["--max-new-tokens", "must be >= 1"]),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--top-p", "0"], ["--top-p", "(0, 1]"]),
    (["eval", "--checkpoint", "x", "--batches", "0"], ["--batches", "must be >= 1"]),
    (["data", "tokenize", "--input", "x", "--output", "y", "--tokenizer", "t", "--workers", "-3"],
     ["--workers", "must be >= 1, got -3"]),
    (["plan", "--config", TINY, "--gpus", "two"], ["--gpus", "expected int, got 'two'"]),
    (["train", "--config", TINY, "train.max_steps=-1"], ["train.max_steps", "got -1"]),
    # issue 33: NaN passed every range check (nan < 0 is False)
    (["generate", "--checkpoint", "x", "--prompt", "a", "--temperature", "nan"],
     ["--temperature", "must be a finite number, got 'nan'"]),
    (["sweep", "fit", "x", "--budget", "nan"], ["--budget", "must be a finite number"]),
    (["generate", "--checkpoint", "x", "--prompt", "a", "--top-p", "nan"], ["--top-p", "finite"]),
])
def test_a_bad_flag_is_one_line_and_exit_2(args, needles, capsys):
    assert main(args) == 2
    err = _one_line(capsys, *needles)
    assert "warmup" not in err


def test_a_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"base: " + TINY.encode() + b"\nmodel:\n  loops: 2  # \xff\xfe\n")
    assert main(["train", "--config", str(bad)]) == 2
    _one_line(capsys, str(bad), "not UTF-8 text (byte")


def test_status_skips_a_torn_metrics_line(run, tmp_path, capsys):
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "checkpoints").symlink_to(run / "checkpoints")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    torn = lines[-1][:len(lines[-1]) // 2]  # a crash mid-write, then the next job appended
    (copy / "metrics.jsonl").write_text("\n".join([*lines, torn + lines[-1], "[1, 2]", ""]))
    assert main(["status", str(copy)]) == 0
    assert "step: 1  loss" in capsys.readouterr().out


def test_eval_data_path_is_a_value_not_yaml(run, tmp_path, capsys):
    odd = tmp_path / "shards, {a: b}] # x"
    odd.mkdir()
    assert main(["eval", "--checkpoint", str(run / "checkpoints/step_0000001"), "--data", str(odd),
                 "--batches", "1"]) == 2
    _one_line(capsys, f"{odd}/manifest.json")


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert main(["export", "--checkpoint", str(run / "checkpoints/step_0000001"), "--out",
                 str(out)]) == 0
    return out


def _hf_copy(exported, tmp_path, config=None, weights=None):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(config if config is not None
                                   else (exported / "config.json").read_text())
    if weights is None:
        (d / "model.safetensors").write_bytes((exported / "model.safetensors").read_bytes())
    else:
        weights(d / "model.safetensors")
    return d


def _shrunk(exported):
    def write(path):
        tensors = load_file(str(exported / "model.safetensors"))
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
        save_file(tensors, str(path))
    return write


@pytest.mark.parametrize("case,needles", [
    ("not json", ["config.json: not JSON"]),
    ("a list", ["config.json: expected a JSON object"]),
    ("garbage weights", ["model.safetensors: not a readable safetensors file"]),
    ("mismatched", ["weights do not match config.json's shapes: norm.weight (63,)"]),
])
def test_import_of_bad_or_mismatched_files_is_one_line(exported, tmp_path, case, needles, capsys):
    d = {"not json": lambda: _hf_copy(exported, tmp_path, config="{hidden_size: 8"),
         "a list": lambda: _hf_copy(exported, tmp_path, config="[1]"),
         "garbage weights": lambda: _hf_copy(exported, tmp_path,
                                             weights=lambda p: p.write_bytes(b"\x10" * 64)),
         "mismatched": lambda: _hf_copy(exported, tmp_path, weights=_shrunk(exported))}[case]()
    assert main(["import", "--hf", str(d), "--out", str(tmp_path / "imported")]) == 2
    _one_line(capsys, *needles)
    assert not (tmp_path / "imported/checkpoints").exists()


def test_import_refuses_a_root_that_holds_files(exported, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["import", "--hf", str(exported), "--out", str(taken)]) == 2
    _one_line(capsys, str(taken), "already exists and is not empty", "--overwrite")
    assert main(["import", "--hf", str(exported), "--out", str(taken), "--overwrite"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("taken.old-")]
    assert len(aside) == 1 and (aside[0] / "notes.txt").read_text() == "mine"
    assert (taken / "checkpoints").is_dir()


def test_tokenize_into_a_directory_holding_shards_without_a_manifest_is_refused(tmp_path, capsys):
    """Issue 25 item 11: a killed run's shards (no manifest yet) are not overwritten name by name."""
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard-000000.tar").write_bytes(b"a killed run's shard")
    (tmp_path / "in.txt").write_text("some words to tokenize\n" * 20)
    assert main(["data", "tokenize", "--input", str(tmp_path / "in.txt"), "--output", str(out),
                 "--tokenizer", "bytes"]) == 2
    _one_line(capsys, str(out), "holds shards without a manifest.json")
    assert (out / "shard-000000.tar").read_bytes() == b"a killed run's shard"


def test_export_into_a_directory_holding_files_is_refused_or_moved_aside(run, exported, tmp_path,
                                                                         capsys):
    stale = tmp_path / "hf"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("a stale tokenizer")
    ckpt = str(run / "checkpoints/step_0000001")
    assert main(["export", "--checkpoint", ckpt, "--out", str(stale)]) == 2
    _one_line(capsys, str(stale), "already exists and is not empty")
    assert main(["export", "--checkpoint", ckpt, "--out", str(stale), "--overwrite"]) == 0
    assert '"model": {' in (stale / "tokenizer.json").read_text()  # the byte tokenizer, written anew
    assert (stale / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("hf.old-")]
    assert (aside / "tokenizer.json").read_text() == "a stale tokenizer"
