"""Hugging Face (Ouro layout) export/import, and eval/generate on a demo-style checkpoint."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from core.durable import new_file_mode
from pretrain.checkpoint.offline import load_model
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.formats.hf import export
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


def test_large_reads_and_writes_say_what_they_do_and_how_long_they_took(tmp_path, capsys,
                                                                        monkeypatch):
    """Issue 36: export, import and convert of a large checkpoint are one call each (a DCP load,
    a safetensors write): a line when each starts, with its size, one when it ends. (Below
    PROGRESS_BYTES they are quiet; this checkpoint is small, so the threshold is lowered.)"""
    from pretrain.checkpoint import offline

    ckpt = _trained(tmp_path / "run")
    monkeypatch.setattr(offline, "PROGRESS_BYTES", 0)
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imp")]) == 0
    assert main(["checkpoint", "convert", str(ckpt), "--out", str(tmp_path / "one")]) == 0
    started = r"(reading|writing) (?:\[1/1\] )?\S+ \(\d+\.\d\d GB\) \.\.\."
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(started, r"\1", line) for line in lines[::2]] == [
        "reading", "writing", "reading", "writing", "reading", "writing"], lines
    assert f"reading [1/1] {tmp_path / 'hf/model.safetensors'}" in lines[4]
    assert all(re.fullmatch(r"  done in \d+\.\d s \(\d+ MB/s\)", line) for line in lines[1::2])


def test_variants_without_ouro_names_are_refused(tmp_path):
    ckpt = _trained(tmp_path / "run", "model.loop_mode=flt")
    with pytest.raises(ConfigError, match="^model.loop_mode: 'flt' has no counterpart in the Ouro"):
        export(ckpt, tmp_path / "hf")


@pytest.mark.multiproc
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


@pytest.mark.multiproc
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
    # rule | readout exit: CE ppl bpb loops | decoded: CE bpb loops
    exits = re.findall(r"^\s+(\S+) \| +([\d.]+) \| +[\d.]+ \| +[\d.]+ \| ([\d.]+) \| "
                       r"+([\d.]+) \| +[\d.]+ \| ([\d.]+)$", out, re.M)
    assert [e[0] for e in exits] == ["gate:0.5", "all", "fixed:1"]
    for col in (2, 4):  # loops used, read out and decoded
        assert float(exits[1][col]) == 3.0 and 1.0 <= float(exits[0][col]) <= 3.0
        assert float(exits[2][col]) == 1.0
    # exiting every token at step 1 is exactly loop step 1's CE; running all loops, step 3's
    # (decoding: a token's step-1 keys/values are the same, so the same to print precision)
    for col in (1, 3):
        assert exits[2][col] == rows[0][1] and exits[1][col] == rows[2][1]
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "The Fox", "--exit",
                 "gate:0.5", "--max-new-tokens", "8"]) == 0
    assert re.search(r"average loops used per decoded token \(gate:0.5\): [\d.]+ of 3",
                     capsys.readouterr().out)
    # the export carries the run's tokenizer: transformers alone loads it and encodes as we do
    from data_pipeline.tokenizer import load_tokenizer

    hf_dir = export(ckpt, tmp_path / "hf")
    got = _load_without_our_code(hf_dir, torch.randint(0, 512, (2, 8)), tmp_path, False)
    assert got["tokens"] == load_tokenizer(data / "tokenizer.json").encode("The Fox").ids


def _load_without_our_code(hf_dir, ids, tmp_path, transformers5: bool) -> dict:
    """tests/hf_check.py in a fresh interpreter, HF offline: transformers 4.56 (the dev
    extras, what the Ouro release targets) or 5.x (installed beside it by `make install`)."""
    import os
    import subprocess
    import sys

    out = str(tmp_path / f"res{int(transformers5)}.pt")
    torch.save(ids, out + ".ids")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT / ".venv/transformers5") if transformers5 else ""}
    res = subprocess.run([sys.executable, str(ROOT / "tests/hf_check.py"), str(hf_dir), out],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)  # an interactive prompt fails, never waits
    assert "Do you wish to run the custom code" not in res.stdout + res.stderr
    assert res.returncode == 0, res.stderr[-3000:]
    return torch.load(out, weights_only=True)


@pytest.mark.multiproc
@pytest.mark.parametrize("transformers5", [False, True], ids=["transformers4.56", "transformers5"])
@pytest.mark.parametrize("tied,kv", [(False, 4), (True, 2)], ids=["untied-mha", "tied-gqa"])
def test_exported_model_loads_in_transformers_and_equals_ours_at_every_loop(
        tmp_path, tied, kv, transformers5):
    """`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` on an export
    computes our logits at every loop step (<= 1e-5), our exit distribution, the release's
    threshold readout, and generates our greedy tokens."""
    from pretrain.model.generate import generate
    from pretrain.model.objective import exit_log_probs

    ckpt = _trained(tmp_path / "run", f"model.tie_embeddings={str(tied).lower()}",
                    f"model.num_kv_heads={kv}", "model.loops=3")
    hf_dir = export(ckpt, tmp_path / "hf")
    cfg = json.loads((hf_dir / "config.json").read_text())
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_ouro.OuroForCausalLM"
    _, model = load_model(ckpt)
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(2))
    got = _load_without_our_code(hf_dir, ids, tmp_path, transformers5)
    assert got["version"].startswith("5." if transformers5 else "4.56")
    assert got["tied"] is tied
    with torch.no_grad():
        ours = model(ids)
    want = torch.stack([lg.transpose(0, 1) for lg in ours.logits])
    assert got["loop_logits"].shape == want.shape == (3, 2, 12, 257)
    # transformers runs our math in the release's module structure: fp32 rounding only
    torch.testing.assert_close(got["loop_logits"], want, rtol=0, atol=1e-5)
    pdf = exit_log_probs(ours.gate_logits).exp().permute(2, 1, 0)  # [B, S, R]
    torch.testing.assert_close(got["exit_pdf"], pdf, rtol=0, atol=1e-6)
    cdf = pdf.cumsum(-1)
    step = torch.where((cdf >= 0.5).any(-1), (cdf >= 0.5).float().argmax(-1), 2)
    pick = want.permute(1, 2, 0, 3)[torch.arange(2)[:, None], torch.arange(12), step]
    torch.testing.assert_close(got["threshold_logits"], pick, rtol=0, atol=1e-5)
    assert torch.equal(got["generated"], generate(model, ids[:1, :5], 6).tokens)
    # the stock calls: a byte-level model exports a tokenizer too; no token_type_ids
    assert got["tokens"] == list(b"The Fox") and got["input_names"] == ["attention_mask", "input_ids"]
    prompt = torch.tensor([list(b"The Fox")])
    assert torch.equal(got["stock_generated"], generate(model, prompt, 4).tokens)
    # every file readable by the user's group and others as the umask allows (not 0600)
    modes = {f.name: f.stat().st_mode & 0o777 for f in hf_dir.iterdir()}
    assert set(modes.values()) == {new_file_mode()} and new_file_mode() & 0o044, modes
