from __future__ import annotations

import json

from pretrain.cli import main
from tests.conftest import ROOT


def test_params_json_for_ouro(capsys):
    assert main(["params", "--config", str(ROOT / "configs/ouro-1.4b.yaml")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == 1_434_652_673
    assert report["non_embedding"] == report["total"] - 2 * 49152 * 2048
    assert report["flops_per_token"] > 6 * report["non_embedding"] * report["loops"]


def test_print_config_prints_the_resolved_config_and_trains_nothing(tmp_path, capsys):
    import yaml

    out = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "model.loops=5",
                 f"train.out_dir={out}", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["model"]["loops"] == 5 and cfg["model"]["hidden_size"] == 64  # override, base
    assert cfg["train"]["checkpoint_minutes"] == 30.0  # a default
    assert not out.exists()


def test_train_then_generate_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "train.max_steps=30",
                 "train.log_every=10", f"train.out_dir={out}",
                 f"data.paths=[{ROOT / 'data/sample.txt'}]"]) == 0
    text = capsys.readouterr().out
    losses = [float(line.split("| loss ")[1].split()[0]) for line in text.splitlines()
              if line.startswith("step")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert f"TensorBoard logs: {out / 'tensorboard'}" in text
    assert (f"out_dir {out}; data: text {ROOT / 'data/sample.txt'}; checkpoints: every 30 min, "
            "at the end, keep 3; validation: off (data.validation: data/validation.txt)") in text
    ckpt = out / "checkpoints/step_0000030"
    assert f"checkpoint: {ckpt}" in text
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # the resolved config in TensorBoard: as text, and as hparams
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    text_tag = next(t for t in events.Tags()["tensors"] if t.startswith("config"))
    assert b"loops: 3" in events.Tensors(text_tag)[0].tensor_proto.string_val[0]
    assert "_hparams_/session_start_info" in events.summary_metadata
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "The Fox",
                 "--max-new-tokens", "8", "--exit", "gate:0.5", "--kv-cache", "last"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("The Fox")
    assert lines[-2].startswith("average loops used per decoded token (gate:0.5):")
    assert len(lines[-2].split("loops per token: ")[1].split()) == 7  # 8 new, the last not fed
    # the tiny model: 2 layers x (k + v) x 2 KV heads x 16 x fp32; `last` keeps one loop's
    assert lines[-1] == "KV cache (last): 0.5 KiB per token"
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "x", "--exit", "gate"]) == 2
    assert capsys.readouterr().err == ("pretrain: error: --exit: exit rule 'gate': expected "
                                       "gate:Q, delta:EPS, kl:EPS, fixed:N or all\n")


def test_data_commands_and_their_one_line_errors(tmp_path, capsys):
    assert main(["data", "train-tokenizer", "--input", str(ROOT / "data/sample.txt"),
                 "--vocab-size", "300", "--output", str(tmp_path / "tok.json")]) == 0
    assert main(["data", "tokenize", "--input", str(ROOT / "data/sample.txt"), "--output",
                 str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--shard-tokens", "1024", "--chunk-tokens", "128", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "1 documents ->" in out and "skipped: none" in out
    assert main(["data", "tokenize", "--input", str(tmp_path / "nope.txt"), "--output",
                 str(tmp_path / "x"), "--tokenizer", str(tmp_path / "tok.json")]) == 2
    assert capsys.readouterr().err == f"pretrain: error: {tmp_path / 'nope.txt'}: input not found\n"
    assert main(["data", "tokenize", "--input", str(ROOT / "data/sample.txt"), "--output",
                 str(tmp_path / "shards"), "--tokenizer", str(tmp_path / "tok.json")]) == 2
    assert "already holds a manifest.json" in capsys.readouterr().err
    assert main(["data", "tokenize", "--input", str(ROOT / "data/sample.txt"), "--output",
                 str(tmp_path / "y"), "--tokenizer", str(ROOT / "data/sample.txt")]) == 2
    assert "not a tokenizer.json" in capsys.readouterr().err


def test_help_imports_no_torch_and_shows_defaults_examples_and_version():
    """`pretrain <cmd> --help` and `--version` parse without importing torch (~0.2 s instead of
    3-8 s: bench/RESULTS.md), show defaults and end with examples; every option has help."""
    import argparse
    import subprocess
    import sys

    from pretrain.cli import build_parser

    code = ("import sys\nfrom pretrain.cli import main\n"
            "for argv in (['--version'], ['train', '--help'], ['generate', '--help'], "
            "['data', 'tokenize', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pretrain 0.1.0" in res.stdout and "--max-new-tokens" in res.stdout
    assert "tokens to generate (default: 64)" in " ".join(res.stdout.split())
    assert "examples:\n  pretrain train --config configs/tiny.yaml" in res.stdout

    def silent(parser, path):
        for a in parser._actions:
            if isinstance(a, argparse._SubParsersAction):
                for name, sp in a.choices.items():
                    yield from silent(sp, [*path, name])
            elif a.option_strings and not a.help:
                yield f"{' '.join(path)} {a.option_strings[0]}"
    assert list(silent(build_parser(), [])) == []
