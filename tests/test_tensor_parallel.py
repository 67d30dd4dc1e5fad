"""Tensor and sequence parallelism (megatron-core on gloo) against the single-process model."""

from __future__ import annotations

import json

import pytest

from pretrain.checkpoint.offline import load_model
from pretrain.cli import main
from pretrain.config import load_config
from tests.conftest import ROOT
from tests.distributed import torchrun
from tests.multiproc.compare import adamw_reach, weights_match
from tests.multiproc.tp_equivalence import VARIANTS

CASES = [f"R{r}-{v}-sp{sp}" for r in (1, 3) for v in VARIANTS for sp in (0, 1)] + [
    f"R3-{v}-sp{sp}-memory" for v in ("ouro", "flt_recipe") for sp in (0, 1)] + [  # recompute, chunks
    f"R3-{v}-sp{sp}-k2" for v in ("ouro", "flt_recipe", "huginn") for sp in (0, 1)]  # backprop window


@pytest.fixture(scope="module", params=[2, 4], ids=["tp2", "tp4"])
def results(request, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp") / "results.json"
    torchrun(request.param, "-m", "tests.multiproc.tp_equivalence", "--out", str(out))
    return request.param, json.loads(out.read_text())


@pytest.mark.multiproc
@pytest.mark.parametrize("case", CASES)
def test_forward_backward_equal_single_process(results, case):
    tp, res = results
    r = res[case]
    # relative errors (compare.py): TP sums partial products in another order, fp32 rounding
    assert r["logits"] < 1e-5 and r["gate"] < 1e-5 and r["loss"] < 1e-5, r
    assert r["grad_close"], f"{r['grad_param']}: {r['grad']}"
    assert r["state_exact"]  # TP shards gathered == the TP=1 model from the same seed
    assert r["stream_rows"] == (16 // tp if "-sp1" in case else 16)


@pytest.mark.multiproc
@pytest.mark.parametrize("sp", [0, 1])
@pytest.mark.parametrize("recipe", ["", "-sampled"])
def test_five_optimizer_steps_match(results, sp, recipe):
    """Plain, and Huginn's recipe (huginn mode, R drawn per step, backprop through 2)."""
    _, res = results
    r = res[f"train-sp{sp}{recipe}"]
    # means over every token and norms over every weight: see the CLI test below for why
    # rel 1e-5 holds after AdamW steps while single weights may not
    for a, b in zip(r["losses_par"], r["losses_ref"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(r["gnorm_par"], r["gnorm_ref"], strict=True):
        assert a == pytest.approx(b, rel=1e-5)


def _run(tmp_path, name, nproc, *overrides):
    out = tmp_path / name
    args = ["train", "--config", str(ROOT / "configs/tiny.yaml"), "model.vocab_size=260",
            "train.max_steps=4", "train.log_every=1", "optim.warmup_steps=0",
            f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={out}", *overrides]
    if nproc == 1:
        assert main(args) == 0
        text = ""
    else:
        text = torchrun(nproc, "-m", "pretrain.cli", *args).stdout
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return text, logged, load_model(out / "checkpoints/step_0000004")[1].state_dict()


@pytest.mark.multiproc
def test_pretrain_train_under_torchrun_tp_and_dp(tmp_path):
    """`pretrain train` under torchrun: TP=2 (+SP), DP=2 and PP=2 train the single-process
    model (checkpoints consolidated from the shards / stages).

    Tolerances: the layouts sum in different orders, so gradients differ by fp32 rounding
    (~1e-7 relative; tests/multiproc/compare.py). Losses and gradient norms -- means over every
    token and norms over every weight -- carry that to rel 1e-5, also after AdamW steps: a
    weight AdamW moved differently is one whose gradient sat at the rounding level of zero (its
    update lr * m / sqrt(v) takes the sign of noise), so it barely moves the loss. The weights
    themselves are not that stable: such a weight can differ by ~lr per step. So a weight
    tensor must match in all but 0.1% of its elements, and every element within twice the
    most AdamW can move a weight in those steps (tests/multiproc/compare.py `weights_match`)."""
    _, ref_log, ref = _run(tmp_path, "ref", 1, "train.micro_batch_size=16")
    runs = {}
    text, *runs["tp"] = _run(tmp_path, "tp", 2, "parallel.tensor=2",
                             "parallel.sequence_parallel=true", "train.micro_batch_size=16")
    assert text.count("step      4/4") == 1 and text.count("checkpoint: saved") == 1  # rank 0
    _, *runs["dp"] = _run(tmp_path, "dp", 2, "parallel.data=2", "train.micro_batch_size=8")
    text, *runs["pp"] = _run(tmp_path, "pp", 2, "parallel.pipeline=2", "train.grad_accum_steps=2",
                             "train.micro_batch_size=8")
    assert "pipeline split (auto): stage 0: 1 layers" in text
    optim = load_config(ROOT / "configs/tiny.yaml").optim
    reach = adamw_reach(optim.lr, optim.beta1, optim.beta2, 4)
    for layout, (logged, state) in runs.items():
        assert [m["step"] for m in logged] == [m["step"] for m in ref_log] == [1, 2, 3, 4]
        for mine, want in zip(logged, ref_log, strict=True):
            for key in ("train/loss", "train/grad_norm"):
                assert mine[key] == pytest.approx(want[key], rel=1e-5), (layout, mine["step"], key)
        assert state.keys() == ref.keys()
        for name, want in ref.items():
            assert weights_match(state[name], want, reach) is None, (layout, name)


BAD_LAYOUTS = [
    (["parallel.tensor=3"], "model.hidden_size: 64 is not divisible by parallel.tensor 3"),
    (["parallel.tensor=4", "model.num_heads=2", "model.num_kv_heads=2", "model.vocab_size=260"],
     "model.num_heads: 2 is not divisible by parallel.tensor 4"),
    (["parallel.tensor=2", "model.num_kv_heads=1", "model.vocab_size=260"],
     "model.num_kv_heads: 1 KV heads cannot be split over parallel.tensor 2 "
     "(needs num_kv_heads % tensor == 0)"),
    (["parallel.tensor=2"], "model.vocab_size: 257 is not divisible by parallel.tensor 2"),
    (["parallel.tensor=2", "model.vocab_size=260"],
     "parallel: tensor 2 x pipeline 1 x data 1 = 2 processes, but 1 were launched"),
    (["parallel.sequence_parallel=true"], "parallel.sequence_parallel: needs parallel.tensor > 1"),
    (["parallel.tensor=2", "model.vocab_size=260", "model.dropout=0.1"],
     "model.dropout: dropout > 0 with parallel.tensor > 1 needs CUDA (megatron's RNG tracker)"),
    (["parallel.tensor=2", "model.vocab_size=260", "parallel.sequence_parallel=true",
      "train.seq_len=63"], "train.seq_len: 63 is not divisible by parallel.tensor 2 "
     "(sequence parallelism)"),
    (["parallel.data=0"], "parallel.data: must be >= 1, got 0"),
]


@pytest.mark.parametrize("overrides,message", BAD_LAYOUTS)
def test_bad_layouts_fail_before_any_process_group(overrides, message, capsys, tmp_path):
    import torch.distributed as dist

    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"),
                 f"train.out_dir={tmp_path}", *overrides]) == 2
    assert capsys.readouterr().err == f"pretrain: error: {message}\n"
    assert not dist.is_initialized()
