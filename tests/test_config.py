from __future__ import annotations

import subprocess
import sys

import pytest

from pretrain.cli import main
from pretrain.config import ConfigError, load_config
from tests.conftest import ROOT, tiny_config

TINY = str(ROOT / "configs/tiny.yaml")

INVALID = [
    (["model.hiden_size=64"], "model.hiden_size: unknown key (did you mean 'hidden_size'?)"),
    (["modle.loops=2"], "modle: unknown key (did you mean 'model'?)"),
    (["model.loops=0"], "model.loops: must be >= 1, got 0"),
    (["model.hidden_size=abc"], "model.hidden_size: expected int, got 'abc'"),
    (["model.hidden_size=65.5"], "model.hidden_size: expected int, got 65.5"),
    (["model.num_heads=5"], "model.num_heads: hidden_size 64 is not divisible by num_heads 5"),
    (["model.num_kv_heads=3"], "model.num_kv_heads: num_heads 4 is not divisible by num_kv_heads 3"),
    (["model.sandwich_norm=maybe"], "model.sandwich_norm: expected bool, got 'maybe'"),
    (["objective.kind=magic"],
     "objective.kind: expected one of 'elbo', 'adaptive_gate', 'last', 'all', 'few', got 'magic'"),
    (["optim.lr=-1"], "optim.lr: must be > 0, got -1.0"),
    (["optim.name=muon", "parallel.zero_stage=1"],
     "optim.name: muon does not shard with DeepSpeed ZeRO: use parallel.zero_stage=0"),
    (["optim.name=muon", "parallel.tensor=2", "model.vocab_size=260"],
     "optim.name: muon orthogonalises whole matrices and a tensor-parallel rank holds a shard: "
     "use parallel.tensor=1 (data and pipeline parallelism compose)"),
    (["model.logit_softcap=-1"], "model.logit_softcap: must be >= 0, got -1.0"),
    (["model.mlp=gelu"], "model.mlp: expected one of 'swiglu', 'relu2', 'relu2_half', got 'gelu'"),
    (["objective.gate_target=ahead"],
     "objective.gate_target: expected one of 'paper', 'lookahead', got 'ahead'"),
    (["optim.min_lr=1.0"], "optim.min_lr: must be in [0, lr=0.003], got 1.0"),
    (["train.seq_len=4096"], "train.seq_len: 4096 exceeds model.max_seq_len 128"),
    (["model.dropout=1.5"], "model.dropout: must be in [0, 1), got 1.5"),
    (["train.micro_batch_size=0"], "train.micro_batch_size: must be >= 1, got 0"),
    (["optim.warmup_steps=-1"], "optim.warmup_steps: must be >= 0, got -1"),
    (["train.max_steps=-1"], "train.max_steps: must be >= 1, got -1"),  # not blamed on warmup
    (["model.head_dim=7"], "model.head_dim: RoPE needs an even head dimension, got 7"),
    (["data.paths=[]"], "data.paths: needs at least one path"),
    (["model.loops"], "override 'model.loops': expected section.key=value"),
    (["model=3"], "model: expected a mapping of fields, got 3"),
    (["objective.kind=adaptive_gate", "model.loops=1"],
     "objective.kind: adaptive_gate needs model.loops >= 2"),
]


@pytest.mark.parametrize("overrides,message", INVALID)
def test_invalid_config_gives_one_line_error_and_exit_2(overrides, message, capsys):
    assert main(["params", "--config", TINY, *overrides]) == 2
    err = capsys.readouterr().err
    assert err == f"pretrain: error: {message}\n"


def test_bad_files(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml: config file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  loops: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml line \d+: invalid YAML"):
        load_config(bad)
    missing = tmp_path / "missing.txt"
    assert main(["train", "--config", TINY, f"data.paths=[{missing}]"]) == 2
    assert f"data.paths[0]: file not found: {missing}" in capsys.readouterr().err
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert main(["train", "--config", TINY, f"data.paths=[{latin}]",
                 f"train.out_dir={tmp_path / 'r'}"]) == 2
    assert "is not UTF-8 text (byte 3)" in capsys.readouterr().err


def test_overrides_types_and_floats():
    cfg = tiny_config("optim.lr=3e-4", "model.loops=5", "model.loop_mode=flt")
    assert cfg.optim.lr == 3e-4 and cfg.model.loops == 5 and cfg.model.loop_mode == "flt"


@pytest.mark.multiproc
def test_console_script_prints_no_traceback():
    script = ROOT / ".venv/bin/pretrain"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "pretrain.cli"]
    res = subprocess.run([*cmd, "train", "--config", TINY, "model.loops=-2"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2
    assert res.stderr == "pretrain: error: model.loops: must be >= 1, got -2\n"


def test_every_shipped_config_resolves_to_its_recorded_values():
    """The FLT grid and the Ouro stages are their differences from one base each; resolved,
    each is exactly what it was as a whole file (tests/data/shipped_configs.json)."""
    import json

    want = json.loads((ROOT / "tests/data/shipped_configs.json").read_text())
    shipped = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))
    assert shipped == sorted(want)
    for name in shipped:
        assert load_config(ROOT / "configs" / name).to_dict() == want[name], name
    inheriting = [n for n in shipped if "base:" in (ROOT / "configs" / n).read_text()]
    assert len(inheriting) >= 15


def test_base_inherits_section_by_section_and_lists_replace(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "root.yaml").write_text(f"base: {TINY}\nmodel: {{loops: 2}}\n")
    (tmp_path / "sub/run.yaml").write_text(
        "base: ../root.yaml\nmodel: {hidden_size: 128}\ntrain: {eval_exits: [all]}\n")
    cfg = load_config(tmp_path / "sub/run.yaml", ["model.num_layers=3"])
    tiny = load_config(TINY)
    assert (cfg.model.loops, cfg.model.hidden_size, cfg.model.num_layers) == (2, 128, 3)
    assert cfg.model.vocab_size == tiny.model.vocab_size and cfg.optim == tiny.optim
    assert cfg.train.eval_exits == ["all"]  # a list replaces the base's, it does not extend it


def test_the_run_directory_holds_the_resolved_config(tmp_path):
    (tmp_path / "run.yaml").write_text(f"base: {TINY}\nmodel: {{loops: 2}}\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), f"train.out_dir={tmp_path / 'r'}",
                 f"data.paths=[{ROOT / 'data/sample.txt'}]", "data.validation=[]",
                 "train.max_steps=1", "train.log_every=1", "optim.warmup_steps=0"]) == 0
    written = (tmp_path / "r/config.yaml").read_text()
    assert "base:" not in written
    assert load_config(tmp_path / "r/config.yaml").model.loops == 2


BAD_BASES = [
    ("base: missing.yaml\n", "base: missing.yaml not found"),
    ("base: [a]\n", "base: expected a YAML file name, got ['a']"),
    ("base: run.yaml\n", "base: run.yaml inherits from itself (run.yaml -> run.yaml)"),
]


@pytest.mark.parametrize("text,message", BAD_BASES)
def test_a_bad_base_is_one_line_naming_the_file(tmp_path, text, message):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'run.yaml'}: ") and message in str(e.value)


def test_a_base_cycle_is_named(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"inherits from itself \(a.yaml -> b.yaml -> a.yaml\)"):
        load_config(tmp_path / "a.yaml")
