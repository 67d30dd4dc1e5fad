"""FLOPs per token against an independent count, and the throughput planner."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.cli import main
from pretrain.config import load_config
from pretrain.model.flops import run_flops_per_token
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import compute_objective, readout_steps, token_cross_entropy
from pretrain.planning.hardware import GPUS
from pretrain.planning.planner import Layout, check, estimate, megatron_gpt_1p7b, plan
from pretrain.planning.rehearse import reference_shapes, rehearse
from tests.conftest import ROOT, VARIANTS, tiny_config


@pytest.mark.parametrize("objective", ["elbo", "last", "few"])
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("kv", [1, 2])
def test_flops_per_token_equals_torch_flop_counter(variant, kv, objective):
    """torch's FlopCounterMode counts every matmul of a real forward + backward (the math SDPA
    backend makes attention matmuls too) of a training step as the trainer runs it (the FLT
    objectives read out fewer loop steps): the formula must equal it exactly, in every mode."""
    cfg = tiny_config(*VARIANTS[variant], f"model.num_kv_heads={kv}", f"objective.kind={objective}")
    model = LoopedLM(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 64))
    read_steps = readout_steps(objective, cfg.model.loops)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = compute_objective(cfg.objective, model(ids, read_steps=read_steps), ids, token_cross_entropy)
        out.loss.backward()
    assert counter.get_total_flops() / ids.numel() == run_flops_per_token(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_len=64)))


MEGATRON_MFU = 0.41  # Megatron-LM README, H100 weak scaling: the smallest GPT, TP1 PP1 DP48
# The README's table is an image: the global batch (384) is an assumption, see bench/RESULTS.md.


def _megatron_row():
    cfg = megatron_gpt_1p7b(tiny_config())
    return estimate(cfg, Layout(tp=1, pp=1, dp=48, micro_batch=1, microbatches=8),
                    GPUS["h100"], global_batch=384)


def test_planner_predicts_megatrons_h100_row_within_10_percent():
    assert _megatron_row().mfu == pytest.approx(MEGATRON_MFU, rel=0.10)


def test_planner_megatron_row_is_feasible_and_compute_bound():
    e = _megatron_row()
    assert e.feasible and e.time_s["tp_comm"] == 0 and e.time_s["bubble"] == 0
    assert e.time_s["compute"] > e.time_s["dp_comm_exposed"] > 0
    assert 0.3 < e.mfu < 0.6


def test_planner_rejects_infeasible_layouts_and_ranks_the_rest():
    cfg = load_config(ROOT / "configs/ouro-1.4b.yaml")
    h100 = GPUS["h100"]
    assert "not divisible by TP 3" in check(cfg, Layout(3, 1, 1, 1, 8), h100, 8)
    assert "spans nodes" in check(cfg, Layout(16, 1, 1, 1, 8), h100, 8)
    assert "PP 32 > 24" in check(cfg, Layout(1, 32, 1, 1, 8), h100, 8)
    assert "multiple of PP 4" in check(cfg, Layout(1, 4, 1, 1, 6), h100, 6)
    too_big = estimate(cfg, Layout(1, 1, 1, 8, 1), h100, 8)  # 8 x 4096 tokens x R=4 on one GPU
    assert not too_big.feasible and "usable (90% of its 80 GB;" in too_big.why
    ranked = plan(cfg, 64, h100, 512)
    feasible = [e for e in ranked if e.feasible]
    assert feasible and all(e.feasible for e in ranked[:len(feasible)])
    assert [e.mfu for e in feasible] == sorted((e.mfu for e in feasible), reverse=True)
    # more pipeline stages, same microbatches: a larger bubble
    a, b = (estimate(cfg, Layout(1, p, 64 // p, 1, 512 // (64 // p)), h100, 512) for p in (2, 8))
    assert b.time_s["bubble"] / b.step_s > a.time_s["bubble"] / a.step_s


def test_plan_command(capsys):
    assert main(["plan", "--config", str(ROOT / "configs/ouro-1.4b.yaml"), "--gpus", "64",
                 "--global-batch", "512", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "layouts fit (64 x H100 SXM" in out and out.count("%") >= 6
    assert main(["plan", "--config", str(ROOT / "configs/ouro-1.4b.yaml"), "--gpus", "8",
                 "--gpu", "tpu"]) == 2


REHEARSED = [(1, 1, 8, 1), (2, 1, 4, 2), (4, 1, 2, 0), (8, 1, 1, 0), (1, 2, 4, 1), (2, 4, 1, 0),
             (1, 8, 1, 0)]


@pytest.mark.parametrize("model", ["ouro-1.4b", "ouro-2.6b"])
def test_rehearse_sets_up_real_layouts_on_meta(model):
    """TP 1-8 x PP 1-8 (auto split) x ZeRO 0-2 for the released shapes, one rank per stage on
    torch's fake process group and the meta device: megatron's TP layers, the stage slices,
    the pipeline, the ZeRO config and checkpoint entries whose global shapes equal one
    process's. 7 layouts per model, 14 in all."""
    config = str(ROOT / f"configs/{model}.yaml")
    reference = reference_shapes(config, [])
    for lay in REHEARSED:
        r = rehearse(config, [], *lay, reference)
        assert r.error == "", (r.name, r.error)


@pytest.mark.parametrize("layout,overrides,message", [
    ((3, 1, 1, 0), [], "model.hidden_size: 2048 is not divisible by parallel.tensor 3"),
    ((1, 2, 4, 0), ["parallel.pipeline_split=[24,0]"],
     "parallel.pipeline_split: [24, 0] must be 2 positive layer counts"),
    ((1, 2, 4, 2), [], "parallel.zero_stage: ZeRO-2 does not compose with the circular pipeline"),
])
def test_rehearse_names_the_field_of_a_layout_that_cannot_work(layout, overrides, message):
    config = str(ROOT / "configs/ouro-1.4b.yaml")
    r = rehearse(config, overrides, *layout, reference_shapes(config, []))
    assert r.error.startswith(message) and "\n" not in r.error, r.error


def test_plan_rehearse_command(capsys):
    assert main(["plan", "--config", str(ROOT / "configs/ouro-1.4b.yaml"), "--gpus", "4",
                 "--rehearse"]) == 0
    out = capsys.readouterr().out
    assert "TP 2 x PP 2 x DP 1, ZeRO 0" in out and "set up" in out
    assert "TP 1 x PP 2 x DP 2, ZeRO 2       cannot run: parallel.zero_stage" in out


def test_plan_names_the_trainer_options_and_the_config_that_runs_it(capsys):
    """Recompute, loss chunks, precision and overlap enter the plan: the header states them,
    they change the prediction, and the best row is printed as the overrides that run it."""
    config = str(ROOT / "configs/ouro-1.4b.yaml")
    assert main(["plan", "--config", config, "--gpus", "64", "--global-batch", "512",
                 "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert ("bf16 autocast, recompute loops (last 1 loops kept), loss chunks 1024, compile off, "
            "grad-reduce overlap on") in out
    assert "pretrain train --config" in out and "train.recompute=loops" in out
    cfg = load_config(config)
    lay = Layout(tp=1, pp=1, dp=64, micro_batch=1, microbatches=8)
    base = estimate(cfg, lay, GPUS["h100"], 512)
    for override in ("train.recompute=none", "train.loss_chunk_tokens=0"):
        more = estimate(load_config(config, [override]), lay, GPUS["h100"], 512)
        assert more.memory_gb["activations"] > base.memory_gb["activations"]
        assert more.step_s < base.step_s  # nothing recomputed
    slow = estimate(load_config(config, ["train.precision=fp32"]), lay, GPUS["h100"], 512)
    assert slow.step_s > 1.5 * base.step_s
    exposed = estimate(load_config(config, ["parallel.overlap_grad_reduce=false"]), lay,
                       GPUS["h100"], 512)
    assert exposed.time_s["dp_comm_exposed"] > base.time_s["dp_comm_exposed"]


@pytest.mark.parametrize("name", ["parcae-1.3b", "flt-flt-k12", "ouro-1.4b"])
def test_every_feasible_row_runs_as_the_planner_prints_it(name):
    """A row is feasible only if the run accepts its overrides: Muon (Parcae's and FLT's
    optimizer) keeps it off ZeRO and TP; Parcae's tied embeddings pipeline."""
    from pretrain.planning.hardware import lookup
    from pretrain.planning.planner import plan, realising_config

    path = ROOT / "configs" / f"{name}.yaml"
    estimates = plan(load_config(path), 16, lookup("h100"), 256)
    feasible = [e for e in estimates if e.feasible]
    assert feasible
    for e in feasible:
        load_config(path, realising_config(load_config(path), e.layout))  # raises if refused
    if name == "parcae-1.3b":
        assert max(e.layout.pp for e in feasible) > 1
