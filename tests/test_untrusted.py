"""Files from elsewhere run no code: a checkpoint's DCP metadata is unpickled through an
allow-list (pretrain/checkpoint/metadata.py); a manifest's shard names are file names and are
shell-quoted into a `pipe:` url_template (data_pipeline/shards.py, stream.py)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest

from data_pipeline.badinput import BadInput, DataError
from data_pipeline.shards import Manifest, tokenize_to_shards
from data_pipeline.stream import ShardSource
from data_pipeline.tokenizer import train_bpe
from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint.metadata import read_metadata
from pretrain.cli import main
from pretrain.train import Trainer
from tests.conftest import ROOT, tiny_config, tiny_train_args


class _Payload:
    """What an attacker puts in `.metadata`: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return tiny_run / "checkpoints/step_0000002"


def test_our_own_metadata_reads_through_the_allow_list(checkpoint):
    md = read_metadata(checkpoint / ".metadata")
    assert "model/embed.weight" in md.state_dict_metadata


@pytest.mark.parametrize("command", ["export", "generate", "eval", "convert", "resume"])
def test_a_crafted_metadata_runs_nothing_and_is_one_line(checkpoint, tmp_path, command, capsys):
    bad = tmp_path / "step_0000001"
    shutil.copytree(checkpoint, bad)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    args = {"export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")],
            "generate": ["generate", "--checkpoint", str(bad), "--prompt", "a"],
            "eval": ["eval", "--checkpoint", str(bad), "--batches", "1"],
            "convert": ["checkpoint", "convert", str(bad), "--out", str(tmp_path / "c")]}
    if command == "resume":
        trainer = Trainer(tiny_config("train.max_steps=2", "optim.warmup_steps=0",
                                      out_dir=tmp_path / "r"), log=None,
                          tensorboard=False)
        with pytest.raises(CheckpointError, match="refused: it asks for posix.system"):
            trainer.resume(str(bad))
    else:
        assert main(args[command]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refused: it asks for posix.system" in err, err
    assert not marker.exists()


def _bytes_entry_bypass(checkpoint, tmp_path, inside: bool):
    """Issue 33's bypass, built from allowed classes only: an entry marked as pickled bytes
    whose storage is a torch.save'd payload -- outside the checkpoint (`../../p.bin`), or
    inside it as one more `__0_1.distcp`; DCP's own load_bytes would torch.load it with
    weights_only=False. meta.json re-recorded to match."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    from pretrain.checkpoint import store

    bad = tmp_path / "run" / "step_0000001"
    shutil.copytree(checkpoint, bad)
    marker = tmp_path / "pwned"
    payload = (bad / "__0_1.distcp") if inside else (tmp_path / "p.bin")
    torch.save(_Payload(marker), payload)
    md = read_metadata(bad / ".metadata")
    md.state_dict_metadata["model/embed.weight"] = BytesStorageMetadata()
    md.storage_data[MetadataIndex("model/embed.weight")] = _StorageInfo(
        "__0_1.distcp" if inside else "../../p.bin", 0, payload.stat().st_size)
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    meta = json.loads((bad / "meta.json").read_text())
    for name in (".metadata", "__0_1.distcp") if inside else (".metadata",):
        meta["files"][name] = store.describe(bad / name)
    (bad / "meta.json").write_text(json.dumps(meta))
    return bad, marker


@pytest.mark.parametrize("inside", [False, True], ids=["outside", "inside"])
@pytest.mark.parametrize("command", ["export", "generate", "eval", "resume"])
def test_a_bytes_entry_runs_nothing(checkpoint, tmp_path, command, inside, capsys):
    bad, marker = _bytes_entry_bypass(checkpoint, tmp_path, inside)
    needle = ("its bytes hold more than tensors" if inside
              else "storage path '../../p.bin' is not one of the checkpoint's own")
    if command == "resume":
        trainer = Trainer(tiny_config("train.max_steps=2", "optim.warmup_steps=0",
                                      out_dir=tmp_path / "r"), log=None, tensorboard=False)
        with pytest.raises(CheckpointError, match=needle):
            trainer.resume(str(bad))
    else:
        args = {"export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")],
                "generate": ["generate", "--checkpoint", str(bad), "--prompt", "a"],
                "eval": ["eval", "--checkpoint", str(bad), "--batches", "1"]}[command]
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert not marker.exists()


def test_a_storage_path_outside_the_checkpoint_is_refused(checkpoint, tmp_path):
    import dataclasses

    bad = tmp_path / "step"
    shutil.copytree(checkpoint, bad)
    md = read_metadata(bad / ".metadata")
    key = next(iter(md.storage_data))
    md.storage_data[key] = dataclasses.replace(md.storage_data[key], relative_path="../x.distcp")
    (bad / ".metadata").write_bytes(pickle.dumps(md))
    with pytest.raises(CheckpointError, match="storage path '../x.distcp' is not one of"):
        read_metadata(bad / ".metadata")


def test_a_symlinked_shard_is_refused(checkpoint, tmp_path):
    from pretrain.checkpoint import store

    bad = tmp_path / "step"
    shutil.copytree(checkpoint, bad)
    shard = next(bad.glob("*.distcp"))
    elsewhere = tmp_path / "elsewhere.distcp"
    shard.rename(elsewhere)
    shard.symlink_to(elsewhere)  # same bytes, same CRC: only the link gives it away
    files = json.loads((bad / "meta.json").read_text())["files"]
    errors = store.verify(bad, files)
    assert errors == [f"{shard}: refused: a symbolic link, not a file of the checkpoint"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    text = (ROOT / "data/sample.txt").read_text()[:30000]
    (root / "in.txt").write_text(text)
    train_bpe([text], 300, root / "tok.json")
    tokenize_to_shards([str(root / "in.txt")], root / "shards", root / "tok.json",
                       shard_tokens=1024, chunk_tokens=64, progress=False)
    return root


def _hostile_copy(shards, tmp_path, name: str):
    bad = tmp_path / "shards"
    shutil.copytree(shards / "shards", bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


@pytest.mark.parametrize("name", ["shard-000000.tar; touch {marker}; #", "../outside.tar",
                                  "-rf.tar", "sub/shard.tar"])
def test_a_shard_name_that_is_not_a_file_name_is_refused(shards, tmp_path, name, capsys):
    marker = tmp_path / "pwned"
    bad = _hostile_copy(shards, tmp_path, name.format(marker=marker))
    with pytest.raises(DataError, match=r"shards\[0\]\.name .* is not a shard file name"):
        Manifest.load(bad)
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), f"train.out_dir={tmp_path / 'r'}",
                 "data.source=shards", f"data.sources=[{{path: {bad}, url_template: "
                 f"'pipe:cat {{dir}}/{{shard}}'}}]", f"data.tokenizer={shards / 'tok.json'}",
                 "data.validation=[]", "model.vocab_size=300", "train.max_steps=1",
                 "optim.warmup_steps=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a shard file name" in err, err
    assert not marker.exists()


def test_pipe_templates_quote_what_they_substitute(shards):
    """The directory is the user's own, but may hold any character: quoted, it stays a word."""
    src = ShardSource(str(shards / "shards"), 7, 0, 0, False, 1 << 20, BadInput("raise"),
                      "pipe:cat {dir}/{shard}")
    odd = ShardSource.__new__(ShardSource)
    odd.dir, odd.url_template = "/data/my corpus;x", src.url_template
    assert odd.url("shard-000000.tar") == "pipe:cat '/data/my corpus;x'/shard-000000.tar"
    src.url_template = "https://host/c/{shard}"  # not a command: substituted as it is
    assert src.url("shard-000000.tar") == "https://host/c/shard-000000.tar"


def test_a_shard_directory_named_pipe_stays_a_directory(shards, tmp_path, monkeypatch):
    """A config's shard directory (a checkpoint's, say) named `pipe:...`: read as files under
    its absolute path, and a plain template cannot turn it into a command either."""
    monkeypatch.chdir(tmp_path)
    name = "pipe:touch pwned; echo "
    shutil.copytree(shards / "shards", tmp_path / name)
    src = ShardSource(name, 7, 0, 0, False, 1 << 20, BadInput("raise"), "")
    assert src.url("shard-000000.tar") == f"{tmp_path / name}/shard-000000.tar"
    src.url_template = "{dir}/{shard}"
    with pytest.raises(DataError, match="makes a pipe: command"):
        src.url("shard-000000.tar")
    assert not (tmp_path / "pwned").exists()


def test_a_file_named_pipe_in_a_directory_or_pattern_is_read_as_a_file(tmp_path, monkeypatch):
    """Only an input typed as `pipe:...` is a command; a file of that name found inside a
    directory or by a glob is text to tokenise (it used to be run)."""
    from data_pipeline.inputs import expand_inputs, units_of

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    marker = corpus / "pwned"  # the command would run in the directory tokenised
    (corpus / "pipe:touch pwned; echo x.txt").write_text("words words words\n")
    (corpus / "a.txt").write_text("more words\n")
    monkeypatch.chdir(corpus)
    for inputs in (["."], ["*"], [str(corpus)]):
        units = units_of(expand_inputs(inputs))
        assert [u.kind for u in units] == ["text", "text"]
        assert all(u.path.startswith("/") for u in units), units
    train_bpe(["words more"] * 50, 300, tmp_path / "tok.json")
    assert main(["data", "tokenize", "--input", "*", "--tokenizer", str(tmp_path / "tok.json"),
                 "--output", str(tmp_path / "shards"), "--shard-tokens", "64",
                 "--chunk-tokens", "8"]) == 0
    assert not marker.exists()
    assert Manifest.load(tmp_path / "shards").documents == 2


def _with_config(checkpoint, tmp_path, *edits):
    """A copy of the checkpoint whose config.yaml (untrusted, like the rest) is edited."""
    bad = tmp_path / "step_0000001"
    shutil.copytree(checkpoint, bad)
    text = (bad / "config.yaml").read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    (bad / "config.yaml").write_text(text)
    return bad


def test_export_parses_the_tokenizer_a_checkpoint_names_and_never_copies_bytes(checkpoint, tmp_path,
                                                                                capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:SECRET\n")
    bad = _with_config(checkpoint, tmp_path, ("tokenizer: ''", f"tokenizer: {secret}"))
    assert main(["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a tokenizer.json" in err, err
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and p != secret
              and b"SECRET" in p.read_bytes()]
    assert leaked == [] and not (tmp_path / "hf").exists()


def test_eval_runs_no_command_a_checkpoint_names(checkpoint, tmp_path, capsys):
    marker = tmp_path / "pwned"
    cmd = f"pipe:touch {marker}; cat {{dir}}/{{shard}}"
    bad = _with_config(checkpoint, tmp_path, ("validation: []", f"validation: [{{path: {tmp_path}, "
                                                                f"url_template: '{cmd}'}}]"))
    assert main(["eval", "--checkpoint", str(bad), "--batches", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a shell command" in err and "--allow-commands" in err, err
    assert not marker.exists()


def test_a_checkpoint_record_naming_files_outside_it_is_refused(checkpoint, tmp_path, capsys):
    bad = tmp_path / "step_0000001"
    shutil.copytree(checkpoint, bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["files"]["../../../etc/hostname"] = {"bytes": 1, "crc32": 0}
    (bad / "meta.json").write_text(json.dumps(meta))
    assert main(["generate", "--checkpoint", str(bad), "--prompt", "a"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'../../../etc/hostname' is not inside the checkpoint" in err, err


@pytest.mark.parametrize("name", [".lock", "config.yaml", "metrics.jsonl"])
def test_a_link_in_the_run_directory_is_never_written_through(tmp_path, name, capsys):
    """Issue 33: a link planted where the trainer writes would truncate the file it points at."""
    victim = tmp_path / "precious.txt"
    victim.write_text("the user's own file\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / name).symlink_to(victim)
    code = main(tiny_train_args(out, "train.max_steps=1"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "refused" in err and name in err, err
    assert victim.read_text() == "the user's own file\n"


def test_the_preemption_marker_is_never_written_through_a_link(tmp_path):
    from core.config_schema import ConfigError
    from core.durable import open_no_link

    victim = tmp_path / "precious.txt"
    victim.write_text("keep\n")
    (tmp_path / ".preempted").symlink_to(victim)
    with pytest.raises(ConfigError, match="refused: a symbolic link"):
        open_no_link(tmp_path / ".preempted")
    assert victim.read_text() == "keep\n"
    with open_no_link(tmp_path / "plain") as fh:  # a plain file: written as usual
        fh.write("x")
    assert (tmp_path / "plain").read_text() == "x"


def test_sweep_collect_runs_no_command_from_a_points_config(checkpoint, tmp_path, capsys):
    """Issue 33: a sweep directory from elsewhere whose point's config names a `pipe:`
    validation source; `collect` refuses it in one line unless --allow-commands."""
    import yaml

    marker = tmp_path / "pwned"
    run = tmp_path / "sweep" / "points" / "0"
    shutil.copytree(checkpoint, run / "checkpoints" / checkpoint.name)
    ckpt = run / "checkpoints" / checkpoint.name
    cfg = yaml.safe_load((ckpt / "config.yaml").read_text())
    cfg["data"]["validation"] = [{"path": str(tmp_path), "url_template": f"pipe:touch {marker}"}]
    (ckpt / "config.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "sweep" / "points.json").write_text(json.dumps(
        {"points": [{"index": 0, "run_dir": str(run)}], "eval_batches": 1}))
    assert main(["sweep", "collect", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a shell command; sweep collect runs none" in err, err
    assert not marker.exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r.update(eval_loss="nan"), "line 2: eval_loss is nan (point 0)"),
    (lambda r: r.update(params="lots"), "line 2: params is 'lots', not a number"),
    (lambda r: r.update(tokens=""), "line 2: no value for tokens"),
])
def test_sweep_fit_refuses_a_row_it_cannot_fit(tmp_path, edit, needle, capsys):
    """Issue 33: a NaN loss made the fit print its starting guess as a law, exit 0."""
    import csv as csv_module

    from pretrain.sweep.collect import COLUMNS

    rows = [{c: "1" for c in COLUMNS} | {"point": str(i), "params": str(1e6 * (i + 1)),
                                          "run_dir": "r", "eval_data": "validation",
                                          "loops_sampler": "fixed"} for i in range(4)]
    edit(rows[0])
    with open(tmp_path / "results.csv", "w", newline="") as fh:
        writer = csv_module.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    assert main(["sweep", "fit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err


def test_sweep_fit_of_a_binary_file_is_one_line(tmp_path, capsys):
    (tmp_path / "results.csv").write_bytes(b"\xff\xfe\x00\x81" * 64)
    assert main(["sweep", "fit", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unreadable as CSV" in err, err


def test_a_path_with_a_hash_stays_that_path(tmp_path):
    """Issue 33: values the program sets travel as values (a `#` began a YAML comment when a
    path was pasted into `key=value` and parsed again)."""
    from pretrain.config import load_config
    from pretrain.sweep.spec import expand, load_spec

    cfg = load_config(ROOT / "configs/tiny.yaml", [("train.out_dir", "/x/imp #1: a")])
    assert cfg.train.out_dir == "/x/imp #1: a"
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {ROOT / 'configs/tiny.yaml'}\nout_dir: '{tmp_path}/runs #1'\n"
                    "grid: {model.loops: [1, 2]}\n")
    points = expand(load_spec(spec))
    dirs = [p.cfg.train.out_dir for p in points]
    assert dirs == [f"{tmp_path}/runs #1/points/0", f"{tmp_path}/runs #1/points/1"]
    assert [p.cfg.model.loops for p in points] == [1, 2]


def _laughs(levels: int = 9) -> str:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]"
              for i in range(levels - 1)]
    return "\n".join(lines) + f"\nmodel: {{num_layers: *{chr(97 + levels - 1)}}}\n"


@pytest.mark.parametrize("text, needle", [
    (_laughs(), "expands to over 100,000 values"),
    ("model: {num_layers: " + "[" * 50000 + "]" * 50000 + "}\n", "nested deeper than 64"),
])
def test_a_hostile_yaml_config_is_one_line_quickly(tmp_path, text, needle, capsys):
    """Issue 33: 382 bytes of aliases of aliases hung the process building repr(value); 50,000
    nested lists raised RecursionError. Both now stop in one line."""
    bad = tmp_path / "bomb.yaml"
    bad.write_text(text)
    assert main(["train", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"),
                 "model.num_layers=" + "[" * 50000 + "]" * 50000]) == 2
    assert "nested deeper than 64" in capsys.readouterr().err
