"""Huginn-0125's format through the CLI: export writes their layout, import reads it back
exactly; the check against their public modeling code runs where the files are given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint.offline import load_model
from pretrain.cli import main
from pretrain.train import Trainer
from tests.conftest import ROOT, VARIANTS, tiny_config

RELEASED = [*VARIANTS["huginn"], "model.num_kv_heads=4", "model.embed_scale=8.0",
            "model.state_std=0.07905694150420949", "recurrence.sampler=poisson_lognormal",
            "recurrence.backprop=2"]


def test_export_then_import_is_exact_through_the_cli(tmp_path, capsys):
    cfg = tiny_config(*RELEASED, "train.max_steps=2", "optim.warmup_steps=1", out_dir=tmp_path / "run")
    Trainer(cfg, log=lambda _: None, tensorboard=False).fit()
    ckpt = tmp_path / "run/checkpoints/step_0000002"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert "huginn_raven layout" in capsys.readouterr().out
    hf = json.loads((tmp_path / "hf/config.json").read_text())
    assert hf["model_type"] == "huginn_raven" and hf["mean_recurrence"] == 3
    assert hf["n_layers_in_recurrent_block"] == 2 and hf["mean_backprop_depth"] == 2
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))
    assert "transformer.core_block.1.attn.Wqkv.weight" in tensors
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    a_cfg, a = load_model(ckpt)
    b_cfg, b = load_model(tmp_path / "back")
    assert b_cfg.recurrence.sampler == "poisson_lognormal" and b_cfg.recurrence.backprop == 2
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith("gate."))
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(0))
    state = torch.randn(12, 1, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(a.eval()(ids, state=state).logits[-1], b.eval()(ids, state=state).logits[-1])


@pytest.mark.skipif(not os.environ.get("HUGINN_MODELING_DIR"),
                    reason="HUGINN_MODELING_DIR unset: the public raven_modeling_minimal.py is not "
                           "vendored (README: Huginn's format)")
def test_public_huginn_code_gives_our_logits():
    res = subprocess.run([sys.executable, "-m", "bench.huginn_public_check", "--modeling",
                          str(Path(os.environ["HUGINN_MODELING_DIR"]))],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
