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


@pytest.mark.multiproc
def test_five_steps_equal_unsharded_adamw(results):
    layout, res = results
    assert sorted(res) == (["zero1"] if layout == "pp" else ["zero1", "zero2"])
    for stage, r in res.items():
        for a, b in zip(r["losses"], r["ref_losses"], strict=True):  # compare.py: losses are
            assert a == pytest.approx(b, rel=1e-5), stage  # means, stable under rounding
        for a, b in zip(r["gnorm"], r["ref_gnorm"], strict=True):  # clipping saw the same norm
            assert a == pytest.approx(b, rel=1e-5), stage
        assert r["param_moved"] > 1e-4  # the optimizer did move the weights...
        assert r["param_mismatch"] == [], stage  # ...as unsharded AdamW (compare.py)


@pytest.mark.multiproc
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


@pytest.mark.multiproc
@pytest.mark.parametrize("stage", [1, 2])
def test_non_finite_step_is_skipped_on_every_rank_and_counted(stage, tmp_path):
    """A NaN loss on one data-parallel rank only: DeepSpeed skips the update on both ranks,
    the trainer counts it, and the next step trains again."""
    out = tmp_path / "nan.json"
    torchrun(2, "-m", "tests.multiproc.zero_equivalence", "--layout", "nan", "--stage",
             str(stage), "--out", str(out))
    ranks = json.loads(out.read_text())
    for r in ranks:
        assert r == {"skipped_ok": False, "skipped": 1, "unchanged": True, "next_ok": True,
                     "moved": True}
