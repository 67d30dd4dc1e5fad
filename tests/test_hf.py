"""Hugging Face (Ouro layout) export/import, and eval/generate on a demo-style checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.offline import load_model
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.hf import export
from pretrain.train import Trainer
from tests.conftest import ROOT, tiny_config
from tests.distributed import torchrun

OURO_LAYER = {"input_layernorm", "input_layernorm_2", "post_attention_layernorm",
              "post_attention_layernorm_2", "self_attn.q_proj", "self_attn.k_proj",
              "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
              "mlp.down_proj"}


def _trained(tmp_path, *overrides):
    cfg = tiny_config("train.max_steps=3", "optim.warmup_steps=1", *overrides, out_dir=tmp_path)
    Trainer(cfg, log=lambda _: None, tensorboard=False).fit()
    return tmp_path / "checkpoints/step_0000003"


@pytest.mark.parametrize("tied", [False, True])
def test_export_import_round_trip_is_exact(tmp_path, tied):
    ckpt = _trained(tmp_path / "run", f"model.tie_embeddings={str(tied).lower()}")
    out = export(ckpt, tmp_path / "hf")
    tensors = load_file(str(out / "model.safetensors"))
    layer_names = {re.sub(r"^model\.layers\.\d+\.|\.weight$", "", k) for k in tensors
                   if k.startswith("model.layers.")}
    assert layer_names == OURO_LAYER
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.early_exit_gate.weight",
            "model.early_exit_gate.bias"} <= set(tensors)
    assert ("lm_head.weight" in tensors) is not tied
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["OuroForCausalLM"] and hf["total_ut_steps"] == 3
    assert hf["num_hidden_layers"] == 2 and hf["num_key_value_heads"] == 2
    assert main(["import", "--hf", str(out), "--out", str(tmp_path / "imported")]) == 0
    a = load_model(ckpt)[1].state_dict()
    b = load_model(tmp_path / "imported")[1].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    again = export(tmp_path / "imported", tmp_path / "hf2")
    again_tensors = load_file(str(again / "model.safetensors"))
    assert all(torch.equal(again_tensors[k], v) for k, v in tensors.items())


def test_variants_without_ouro_names_are_refused(tmp_path):
    ckpt = _trained(tmp_path / "run", "model.loop_mode=flt")
    with pytest.raises(ConfigError, match="^model.loop_mode: 'flt' has no counterpart in the Ouro"):
        export(ckpt, tmp_path / "hf")


def test_export_from_tp2_pp2_equals_export_from_the_consolidated_checkpoint(tmp_path):
    run = tmp_path / "run"
    torchrun(4, "-m", "tests.multiproc.ckpt_run", "--out", str(tmp_path / "r.json"),
             "model.vocab_size=260", "train.max_steps=2", "optim.warmup_steps=1",
             "train.seq_len=32", "parallel.tensor=2", "parallel.pipeline=2",
             "train.micro_batch_size=4", "train.grad_accum_steps=2", f"train.out_dir={run}")
    ckpt = run / "checkpoints/step_0000002"
    assert main(["checkpoint", "convert", str(ckpt), "--out", str(tmp_path / "one")]) == 0
    a = load_file(str(export(ckpt, tmp_path / "hf_sharded") / "model.safetensors"))
    b = load_file(str(export(tmp_path / "one/step_0000002", tmp_path / "hf_one")
                      / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_eval_and_generate_on_a_demo_checkpoint(tmp_path, capsys):
    """The demo's path in small: BPE + shards, TP=2 training, then eval and generate."""
    data = tmp_path / "data"
    sample = str(ROOT / "data/sample.txt")
    assert main(["data", "train-tokenizer", "--input", sample, "--vocab-size", "512",
                 "--output", str(data / "tokenizer.json")]) == 0
    assert main(["data", "tokenize", "--input", sample, "--tokenizer", str(data / "tokenizer.json"),
                 "--output", str(data / "shards"), "--shard-tokens", "2048",
                 "--chunk-tokens", "256"]) == 0
    torchrun(2, "-m", "pretrain.cli", "train", "--config", str(ROOT / "configs/tiny.yaml"),
             f"train.out_dir={tmp_path / 'run'}", "parallel.tensor=2", "train.max_steps=20",
             "optim.warmup_steps=2", "data.source=shards",
             f"data.sources=[{{path: {data / 'shards'}}}]",
             f"data.tokenizer={data / 'tokenizer.json'}", "model.vocab_size=512")
    ckpt = str(tmp_path / "run/checkpoints/step_0000020")
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, "--data", str(data / "shards"), "--batches", "2",
                 "--exit", "gate:0.5", "all", "fixed:1"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\s+(\d) \| +([\d.]+) \|", out, re.M)
    assert [int(r) for r, _ in rows] == [1, 2, 3]
    exits = re.findall(r"^\s+(\S+) \| +([\d.]+) \| +[\d.]+ \| ([\d.]+)$", out, re.M)
    assert [q for q, _, _ in exits] == ["gate:0.5", "all", "fixed:1"]
    assert float(exits[1][2]) == 3.0 and 1.0 <= float(exits[0][2]) <= 3.0
    assert float(exits[2][2]) == 1.0
    # exiting every token at step 1 is exactly loop step 1's CE; running all loops, step 3's
    assert float(exits[2][1]) == float(rows[0][1]) and float(exits[1][1]) == float(rows[2][1])
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "The Fox", "--exit",
                 "gate:0.5", "--max-new-tokens", "8"]) == 0
    assert re.search(r"average loops used per decoded token \(gate:0.5\): [\d.]+ of 3",
                     capsys.readouterr().out)
