"""Issue 33, item 7: inputs that ended in a traceback (exit 1) now end in one line (exit 2),
or, for a damaged newest checkpoint, in a resume from the one before; and a save's temporary
names are never followed through a link."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import torch

from pretrain.checkpoint.metadata import read_metadata
from pretrain.checkpoint.store import describe
from pretrain.cli import main
from tests.conftest import ROOT, tiny_train_args


def _one_line(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    return err


@pytest.fixture
def run(tiny_run, tmp_path):
    """A copy of the 2-step run (checkpoints at steps 1 and 2) to damage."""
    shutil.copytree(tiny_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("text, needle", [
    ("[]", "not a checkpoint record"),
    ('{"files": 3}', "no step"),
    ('{"step": "x"}', "step is 'x', not an integer"),
    ('{"step": 2, "layout": {"tensor": 1, "pipeline": 1, "data": 1}, "files": {}}',
     "files: .metadata is not listed"),
])
def test_a_meta_json_of_the_wrong_shape_is_one_line_and_resume_falls_back(run, text, needle,
                                                                           capsys):
    newest = run / "checkpoints/step_0000002"
    (newest / "meta.json").write_text(text)
    assert main(["generate", "--checkpoint", str(newest), "--prompt", "a"]) == 2
    _one_line(capsys, needle)
    assert main(tiny_train_args(run, "train.max_steps=3", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert needle in out and "falling back to the one before" in out, out
    assert "resumed from" in out and "step_0000001 at step 1" in out, out
    assert (run / "checkpoints/step_0000002.damaged").is_dir()  # set aside, not deleted


def test_a_trainer_state_of_the_wrong_shape_falls_back(run, capsys):
    newest = run / "checkpoints/step_0000002"
    meta = json.loads((newest / "meta.json").read_text())
    meta["trainer"]["data"]["samples_consumed"] = "many"
    (newest / "meta.json").write_text(json.dumps(meta))
    assert main(tiny_train_args(run, "train.max_steps=3", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "trainer.data: samples_consumed is 'many'" in out and "at step 1" in out, out


@pytest.mark.parametrize("text", ["model: [", "- 1\n- 2\n", "model: {loops: x}\n", ""])
def test_a_damaged_config_yaml_in_the_newest_checkpoint_falls_back(run, text, capsys):
    (run / "checkpoints/step_0000002/config.yaml").write_text(text)
    assert main(tiny_train_args(run, "train.max_steps=3", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "damaged checkpoint config" in out and "at step 1" in out, out


def test_a_damaged_config_yaml_in_the_only_checkpoint_is_one_line(run, capsys):
    shutil.rmtree(run / "checkpoints/step_0000002")
    (run / "checkpoints/step_0000001/config.yaml").write_text("model: {loops: x}\n")
    assert main(tiny_train_args(run, "train.max_steps=3", "--resume", "auto")) == 2
    _one_line(capsys, "damaged checkpoint config")


@pytest.mark.parametrize("size, needle", [
    ([10**13, 64], "needs 2,560,000,000,000,000 bytes"),
    ([2**62, 2**62], "the checkpoint's shard files hold"),
    ([-5, 64], "is not a tensor's"),
])
@pytest.mark.parametrize("command", ["generate", "convert"])
def test_metadata_sizes_past_the_shard_files_are_refused_before_allocating(run, tmp_path, size,
                                                                         needle, command, capsys):
    """A `.metadata` (with meta.json's CRC made to match) claiming a tensor of 10^13 rows:
    `convert` allocated it before reading a byte (a MemoryError traceback)."""
    ckpt = run / "checkpoints/step_0000002"
    md = read_metadata(ckpt / ".metadata")
    entry = md.state_dict_metadata["model/embed.weight"]
    entry.size = torch.Size(size)
    for chunk in entry.chunks:
        chunk.sizes = torch.Size(size)
    (ckpt / ".metadata").write_bytes(pickle.dumps(md))
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][".metadata"] = describe(ckpt / ".metadata")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    args = {"generate": ["generate", "--checkpoint", str(ckpt), "--prompt", "a"],
            "convert": ["checkpoint", "convert", str(ckpt), "--out", str(tmp_path / "c")]}
    assert main(args[command]) == 2
    _one_line(capsys, needle)


@pytest.mark.parametrize("prompt, extra, needle", [
    ("", [], "--prompt: empty"),
    ("a b " * 100, ["--max-new-tokens", "2"], "exceed the model's max_seq_len 128"),
    ("a", ["--max-new-tokens", "128"], "1 tokens + --max-new-tokens 128 exceed"),
])
def test_generate_prompts_that_cannot_run_are_one_line(tiny_run, prompt, extra, needle, capsys):
    ckpt = tiny_run / "checkpoints/step_0000002"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", prompt, *extra]) == 2
    _one_line(capsys, needle)


def _spec(tmp_path, body: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {ROOT / 'configs/tiny.yaml'}\nout_dir: {tmp_path / 'sw'}\n"
                    f"grid: {{model.loops: [1, 2]}}\n{body}")
    return spec


@pytest.mark.parametrize("body, needle", [
    ("slurm: {time: 4:00:00}\n", "slurm.time: 14400 is a number"),
    ("slurm: {nodes: two}\n", "slurm.nodes: expected int, got 'two'"),
    ("slurm: {gpus: 8}\n", "slurm.gpus: unknown key"),
    ("slurm: {concurrent: -1}\n", "slurm.concurrent: expected an integer >= 0"),
    ("slurm: [1]\n", "slurm: expected a mapping"),
    ("eval_batches: 0\n", "eval_batches: must be >= 1"),
    ("overrides: model.loops=2\n", "overrides: expected a list"),
])
def test_sweep_specs_of_the_wrong_types_are_one_line(tmp_path, body, needle, capsys):
    assert main(["sweep", "--spec", str(_spec(tmp_path, body)), "--submit"]) == 2
    _one_line(capsys, needle)


def test_a_sweep_spec_that_is_not_a_mapping_is_one_line(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text("base: 3\nout_dir: [1]\ngrid: 4\n")
    assert main(["sweep", "--spec", str(tmp_path / "spec.yaml"), "--local"]) == 2
    _one_line(capsys, "base: expected a string, got 3")
    (tmp_path / "spec.yaml").write_text("[1, 2]\n")
    assert main(["sweep", "--spec", str(tmp_path / "spec.yaml"), "--local"]) == 2
    _one_line(capsys, "expected a mapping of keys")


@pytest.mark.parametrize("index, needle", [
    ("[]", "expected {\"points\""),
    ('{"points": [{"index": "0"}]}', "expected {\"points\""),
    ('{"points": [], "eval_batches": "8"}', "eval_batches: expected an integer >= 1"),
    ("{" * 100000, "unreadable"),
])
def test_sweep_collect_of_a_damaged_index_is_one_line(tmp_path, index, needle, capsys):
    (tmp_path / "points.json").write_text(index)
    assert main(["sweep", "collect", str(tmp_path)]) == 2
    _one_line(capsys, needle)


def test_sweep_collect_reads_points_where_the_sweep_put_them_not_where_the_index_says(
        tiny_run, tmp_path, capsys):
    """A moved (or foreign) sweep directory: the index's run_dir is not followed."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_run, elsewhere)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "points.json").write_text(json.dumps(
        {"points": [{"index": 0, "run_dir": str(elsewhere)}], "eval_batches": 1}))
    assert main(["sweep", "collect", str(sweep)]) == 0
    assert "1 point(s) without a checkpoint: [0]" in capsys.readouterr().out


@pytest.fixture(scope="module")
def hf_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "export"
    assert main(["export", "--checkpoint", str(tiny_run / "checkpoints/step_0000002"),
                 "--out", str(out)]) == 0
    return out


def _import(hf_export, tmp_path, edit_weights=None, edit_config=None, *flags):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "hf"
    shutil.copytree(hf_export, src)
    if edit_weights:
        tensors = load_file(src / "model.safetensors")
        edit_weights(tensors)
        save_file(tensors, src / "model.safetensors")
    if edit_config:
        config = json.loads((src / "config.json").read_text())
        edit_config(config)
        (src / "config.json").write_text(json.dumps(config))
    return main(["import", "--hf", str(src), "--out", str(tmp_path / "out"), *flags])


NAME = "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("edit, needle", [
    (lambda w: w.pop(NAME), f"weight {NAME} missing"),
    (lambda w: w.pop("model.norm.weight"), "no weight for norm.weight"),
    (lambda w: w.__setitem__(NAME, torch.zeros(3, 3)), "block.0.mlp.down_proj.weight (3, 3)"),
    (lambda w: w.__setitem__(NAME, w[NAME].to(torch.int32)), f"{NAME} is int32, not a float"),
    (lambda w: w.__setitem__(NAME, w[NAME] > 0), f"{NAME} is bool, not a float"),
    (lambda w: w.__setitem__(NAME, w[NAME].to(torch.float8_e4m3fn)), "float8_e4m3fn, not a float"),
    (lambda w: w[NAME].view(-1).__setitem__(5, float("nan")), f"{NAME} holds NaN or Inf"),
    (lambda w: w[NAME].view(-1).__setitem__(5, float("inf")), f"{NAME} holds NaN or Inf"),
])
def test_import_refuses_weights_it_would_have_cast_or_dropped(hf_export, tmp_path, edit, needle,
                                                              capsys):
    assert _import(hf_export, tmp_path, edit) == 2
    _one_line(capsys, needle)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_import_takes_nonfinite_weights_when_told(hf_export, tmp_path, capsys):
    def nan(w):
        w[NAME].view(-1)[5] = float("nan")
    assert _import(hf_export, tmp_path, nan, None, "--allow-nonfinite") == 0


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c.update(hidden_size="big"), "model.hidden_size: expected int, got 'big'"),
    (lambda c: c.update(tie_word_embeddings="false"), "model.tie_embeddings: expected bool"),
    (lambda c: c.pop("vocab_size"), "missing field 'vocab_size'"),
])
def test_import_of_an_ouro_config_of_the_wrong_types_is_one_line(hf_export, tmp_path, edit,
                                                                 needle, capsys):
    assert _import(hf_export, tmp_path, None, edit) == 2
    _one_line(capsys, needle)


@pytest.mark.parametrize("field, value, needle", [
    ("n_embd", "64", "n_embd: expected a positive integer, got '64'"),
    ("n_embd", -64, "n_embd: expected a positive integer"),
    ("mean_backprop_depth", 2.5, "mean_backprop_depth: expected an integer >= 0"),
    ("qk_bias", "yes", "model.qk_bias: expected bool"),
    ("n_heads", None, "model.num_heads: expected int"),
])
def test_import_of_a_huginn_config_of_the_wrong_types_is_one_line(tmp_path, field, value, needle,
                                                                  capsys):
    from pretrain.formats.huginn import huginn_config
    from tests.conftest import VARIANTS, tiny_config

    src = tmp_path / "hf"
    src.mkdir()
    config = huginn_config(tiny_config(*VARIANTS["huginn"]))
    config[field] = value
    (src / "config.json").write_text(json.dumps(config))
    (src / "model.safetensors").write_bytes(b"")
    assert main(["import", "--hf", str(src), "--out", str(tmp_path / "out")]) == 2
    _one_line(capsys, needle)


@pytest.mark.parametrize("command, out", [("export", "."), ("export", ".."), ("export", "/"),
                                          ("train", ".")])
def test_overwrite_never_moves_the_current_directory_or_one_above(tiny_run, tmp_path, monkeypatch,
                                                                  out, command, capsys):
    """`--out . --overwrite` raised ValueError ('.' has an empty name); `--out ..` renamed the
    user's parent directory."""
    work = tmp_path / "work"
    shutil.copytree(tiny_run, work)  # a run's checkpoints: train's --overwrite would move it
    monkeypatch.chdir(work)
    args = {"export": ["export", "--checkpoint", str(tiny_run / "checkpoints/step_0000002"),
                       "--out", out, "--overwrite"],
            "train": [*tiny_train_args(out, "train.max_steps=1"), "--overwrite"]}[command]
    assert main(args) == 2
    _one_line(capsys, "refused to move it aside")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    assert (work / "checkpoints/step_0000002/meta.json").is_file()


def test_a_save_never_writes_through_links_planted_at_its_temporary_names(tmp_path):
    """Issue 33: `step_N.tmp` (rmtree(ignore_errors) left a link in place) and `latest.tmp`
    (write_text followed it) are cleared, links unlinked, before a save uses them."""
    victim_dir, victim = tmp_path / "precious", tmp_path / "precious.txt"
    victim_dir.mkdir()
    (victim_dir / "notes.txt").write_text("keep\n")
    victim.write_text("keep\n")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/step_0000001.tmp").symlink_to(victim_dir)
    (run / "checkpoints/latest.tmp").symlink_to(victim)
    assert main(tiny_train_args(run, "train.max_steps=1")) == 0
    assert sorted(p.name for p in victim_dir.iterdir()) == ["notes.txt"]
    assert victim.read_text() == (victim_dir / "notes.txt").read_text() == "keep\n"
    assert (run / "checkpoints/latest").read_text() == "step_0000001\n"
    assert (run / "checkpoints/step_0000001/meta.json").is_file()


@pytest.mark.parametrize("text, needle", [
    (b"\x80\x81 not text", "not UTF-8 text"),
    (b"base: ../../../victim.yaml\n", "base: refused"),
])
@pytest.mark.parametrize("command", ["convert", "generate", "resume"])
def test_a_checkpoint_config_is_read_whole_and_as_text(run, tmp_path, text, needle, command,
                                                       capsys):
    """Found by the fuzz tier: `convert` copied a non-UTF-8 config.yaml with read_text (a
    traceback). And a checkpoint's config may name no other file (`base:`) to read."""
    (tmp_path / "victim.yaml").write_text("model: {loops: 3}\n")
    shutil.rmtree(run / "checkpoints/step_0000001")
    ckpt = run / "checkpoints/step_0000002"
    (ckpt / "config.yaml").write_bytes(text)
    args = {"convert": ["checkpoint", "convert", str(ckpt), "--out", str(tmp_path / "c")],
            "generate": ["generate", "--checkpoint", str(ckpt), "--prompt", "a"],
            "resume": [*tiny_train_args(run, "train.max_steps=3"), "--resume", "auto"]}[command]
    assert main(args) == 2
    _one_line(capsys, needle)


def test_import_of_pieces_that_do_not_fit_together_is_one_line(hf_export, tmp_path, capsys):
    """Found by the fuzz tier: a q projection cut to 1-D met 2-D k and v in torch.cat."""
    name = "model.layers.0.self_attn.q_proj.weight"
    assert _import(hf_export, tmp_path, lambda w: w.__setitem__(name, w[name].reshape(-1))) == 2
    _one_line(capsys, "weights do not match config.json's shapes (Tensors must have same number")


def test_a_sweep_spec_override_that_is_not_text_is_one_line(tmp_path, capsys):
    """Found by the fuzz tier: `overrides: [null]` reached set_dotted (a TypeError)."""
    assert main(["sweep", "--spec", str(_spec(tmp_path, "overrides: [null]\n")), "--submit"]) == 2
    _one_line(capsys, "overrides: expected a list of `section.key=value` strings")


@pytest.mark.parametrize("edit", [
    lambda r: r.update({"train/loss": None}), lambda r: r.pop("train/tokens_per_s"),
    lambda r: r.update({"train/loss": "low"}),
])
def test_status_reads_a_metrics_record_of_the_wrong_shape(run, edit, capsys):
    """Issue 33: a metrics.jsonl record with `loss: null` (a TypeError in status)."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    edit(record)
    (run / "metrics.jsonl").write_text("\n".join([*lines[:-1], json.dumps(record), "[" * 10**5]))
    assert main(["status", str(run)]) == 0
    assert "step: " in capsys.readouterr().out


def test_a_sweep_spec_with_a_null_eval_batches_takes_the_default(tmp_path, monkeypatch):
    """Found by the fuzz tier: `eval_batches: null` reached `None < 1` (a TypeError)."""
    import slurm.submit

    monkeypatch.setattr(slurm.submit, "sbatch", lambda *a, **k: "123")
    spec = _spec(tmp_path, "eval_batches: null\nslurm: {time: '00:10:00'}\n")
    assert main(["sweep", "--spec", str(spec), "--submit"]) == 0
    assert json.loads((tmp_path / "sw/points.json").read_text())["eval_batches"] == 8
