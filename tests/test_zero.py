"""ZeRO-1/2 through DeepSpeed (gloo, CPU) against the single-process trainer with AdamW."""

from __future__ import annotations

import json

import pytest

from pretrain.cli import main
from tests.conftest import ROOT
from tests.distributed import torchrun


@pytest.fixture(scope="module", params=[("dp", 2), ("tp", 4), ("pp", 4)],
                ids=["dp2", "tp2xdp2", "pp2xdp2"])
def results(request, tmp_path_factory):
    layout, nproc = request.param
    out = tmp_path_factory.mktemp("zero") / "results.json"
    torchrun(nproc, "-m", "tests.multiproc.zero_equivalence", "--layout", layout,
             "--out", str(out))
    return layout, json.loads(out.read_text())


def test_five_steps_equal_unsharded_adamw(results):
    layout, res = results
    assert sorted(res) == (["zero1"] if layout == "pp" else ["zero1", "zero2"])
    for stage, r in res.items():
        for a, b in zip(r["losses"], r["ref_losses"], strict=True):
            assert a == pytest.approx(b, rel=1e-5), stage
        for a, b in zip(r["gnorm"], r["ref_gnorm"], strict=True):  # clipping saw the same norm
            assert a == pytest.approx(b, rel=1e-5), stage
        assert r["param_moved"] > 1e-4  # the optimizer did move the weights...
        assert r["param_abs_err"] < 1e-5, stage  # ...exactly as unsharded AdamW


def test_optimizer_state_is_sharded_over_data_parallel_ranks(results):
    _, res = results
    for r in res.values():
        ideal = r["unsharded_bytes"] / r["dp"]
        assert r["state_bytes"] <= 1.05 * ideal
        assert r["state_bytes"] >= 0.95 * ideal


@pytest.mark.parametrize("overrides,message", [
    (["parallel.zero_stage=3"], "parallel.zero_stage: must be 0, 1 or 2, got 3"),
    (["parallel.zero_stage=2", "parallel.pipeline=2", "train.grad_accum_steps=2"],
     "parallel.zero_stage: ZeRO-2 does not compose with the circular pipeline (DeepSpeed "
     "reduces a gradient partition once per step; the laps produce it several times): use "
     "zero_stage 1"),
])
def test_bad_zero_settings(overrides, message, capsys, tmp_path):
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"),
                 f"train.out_dir={tmp_path}", *overrides]) == 2
    assert capsys.readouterr().err == f"pretrain: error: {message}\n"


@pytest.mark.parametrize("stage", [1, 2])
def test_non_finite_step_is_skipped_by_deepspeed_and_counted(stage, tmp_path):
    import torch

    from pretrain.train import Trainer
    from tests.conftest import tiny_config

    cfg = tiny_config(f"parallel.zero_stage={stage}", "train.max_steps=4", "optim.warmup_steps=0",
                      out_dir=tmp_path)
    trainer = Trainer(cfg, log=lambda _: None, tensorboard=False)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real = trainer.model.forward

    def poisoned(ids, loops=None):
        out = real(ids, loops)
        out.logits[-1] = out.logits[-1] * float("nan")
        return out

    trainer.model.forward = poisoned
    *_, ok = trainer.train_step()
    assert not ok and trainer.skipped == 1
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    trainer.model.forward = real
    *_, ok = trainer.train_step()
    assert ok and trainer.bad_streak == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(),
                                                      strict=True))
