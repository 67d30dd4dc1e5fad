"""`pretrain plan --fake`: the fake-tensor step's counters against hand counts, and the planner
against the fake step (memory terms, FLOPs, collectives, the launch term's op count)."""

from __future__ import annotations

import dataclasses
import gc

import pytest
import torch
from packaging.version import Version
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn import functional as F

from parallelism.topology import Topology
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.model.looped import LoopedLM
from pretrain.planning.fake_step import OpCount, StepProfile, _batches, eager_ops, profile_layout
from pretrain.planning.hardware import GPUS
from pretrain.planning.plan_check import check_layout
from pretrain.planning.planner import Layout, estimate
from pretrain.step_engine import build_engine
from tests.conftest import tiny_config

# weights large beside the activations, so every per-parameter term of the planner is several
# percent of the total: a term it forgot moves the ratio past the 5% the issue allows
WIDE = ["model.hidden_size=512", "model.num_heads=8", "model.num_kv_heads=8",
        "model.ffn_hidden_size=1408", "model.vocab_size=512", "model.loops=2", "train.seq_len=32",
        "train.micro_batch_size=1", "train.grad_accum_steps=2"]
# torch 2.9.1 has no fake kernels for c10d's ops: `plan --fake` of a multi-rank layout says so
# in one line there (2.13.0 runs them; the versions between are not checked)
OLD_TORCH = Version(torch.__version__).release < (2, 13)
NEEDS_FAKE_C10D = pytest.mark.skipif(OLD_TORCH, reason="this torch fakes no c10d collectives")


def test_storage_peak_counts_a_shared_weight_once_and_each_call_its_saved_input():
    """A weight applied R times keeps R inputs for backward and is itself counted once; views
    of a storage add nothing; a freed storage leaves the count."""
    b, h, r = 8, 16, 3
    with FakeTensorMode():
        w = torch.randn(h, h, requires_grad=True)
        x = torch.randn(b, h)
        prof = StepProfile()
        prof.hold(w)
        with prof:
            y = x
            for _ in range(r):
                y = torch.tanh(y @ w)  # saves y (input of mm) and tanh's output
            view = y.view(-1)
            assert view.untyped_storage()._cdata == y.untyped_storage()._cdata
    f = 4
    # w, each call's tanh output (saved for backward), and the last call's mm output while its
    # tanh is computed (x was made before the profile: not counted)
    assert prof.peak == h * h * f + (r + 1) * b * h * f
    del y, view
    gc.collect()
    assert prof.live == h * h * f


def test_flops_count_matmuls_and_the_cpu_flash_attention_as_the_cuda_one():
    b, heads, s, d = 2, 4, 32, 8
    with FakeTensorMode():
        q, k, v = (torch.randn(b, heads, s, d) for _ in range(3))
        a, c = torch.randn(5, 7), torch.randn(7, 3)
        with StepProfile() as prof:
            a @ c
        assert prof.flops == 2 * 5 * 7 * 3
        with StepProfile() as prof:
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert prof.flops == 2 * 2 * b * heads * s * s * d  # scores and weighted sum, full


def test_eager_ops_equal_the_real_step_at_real_widths():
    """The launch term's op count comes from the smallest widths; the real step at the
    config's widths with 3 micro-batches must dispatch exactly per-micro-batch x 3 + per-step."""
    cfg = tiny_config("train.grad_accum_steps=3", "train.loss_chunk_tokens=24",
                      "train.recompute=loops")
    per_mb, per_step = eager_ops(cfg)
    engine = build_engine(cfg, LoopedLM(cfg.model), Topology(), log=lambda _: None)
    with OpCount() as count:
        engine.train_step(_batches(cfg), 0)  # inputs and labels: distinct tensors, as loaded
    assert count.ops == 3 * per_mb + per_step
    assert per_mb > 5 * per_step > 0


@pytest.mark.parametrize("layout", [
    ["parallel.data=2"],  # bf16 autocast cache + the reducer's bucket copies
    ["parallel.data=2", "train.precision=fp32"],  # no autocast cache
    ["parallel.data=2", "parallel.zero_stage=1"],
    ["parallel.pipeline=2", "train.grad_accum_steps=2"],
    # a miss, kept visible: 1.053 here, 1.175 at Ouro-1.4B TP 2 (bench/RESULTS.md, issue 34)
    pytest.param(["parallel.tensor=2", "parallel.sequence_parallel=true"],
                 marks=pytest.mark.xfail(strict=True, reason="the planner misses TP's peak")),
])
@NEEDS_FAKE_C10D
def test_planner_memory_within_5_percent_and_flops_equal_to_the_fake_step(layout):
    """The issue's goals at a shape where the per-parameter terms are each > 5% of the total:
    without the autocast cache (2 B/param) or the bucket copies (4 B/param) the ratio leaves
    the band. FLOPs: the same convention (executed, full scores, flash backward 2.5 x)."""
    cfg = tiny_config("train.precision=bf16", *WIDE, *layout)
    check = check_layout(cfg, GPUS["h100"])
    mem = check.plan.memory_gb
    assert abs(check.memory_ratio - 1) < 0.05, (check.memory_ratio, mem)
    assert abs(check.flops_ratio - 1) < 1e-3, check.flops_ratio
    if cfg.parallel.data > 1 and not cfg.parallel.zero_stage:
        assert mem["grad_buckets"] / mem["total"] > 0.05
        assert check.comm_ratio == pytest.approx(1, rel=1e-3)  # the reducer's all-reduce
    if cfg.train.precision == "bf16":
        assert mem["autocast_cache"] / mem["total"] > 0.05


def test_launch_term_lets_the_larger_micro_batch_win_a_small_model():
    """Same tokens per step: 16 micro-batches of 1 dispatch 16x the ops of 2 of 8; where the
    GPU work is small the host's launches decide, as they do on a real GPU."""
    cfg = tiny_config("train.precision=bf16")
    gpu = GPUS["h100"]
    small = estimate(cfg, Layout(1, 1, 1, 1, 16, zero=False), gpu, 16)
    large = estimate(cfg, Layout(1, 1, 1, 8, 2, zero=False), gpu, 16)
    assert small.time_s["launch"] == pytest.approx(8 * large.time_s["launch"], rel=0.1)
    assert small.step_s > small.time_s["compute"]  # host-bound
    assert large.tokens_per_s > small.tokens_per_s


def test_fake_profile_runs_every_stage_of_a_pipeline():
    cfg = tiny_config(*WIDE, "parallel.pipeline=2", "train.grad_accum_steps=2")
    if OLD_TORCH:  # one line saying so, not a traceback
        with pytest.raises(ConfigError, match="cannot run c10d.* under fake tensors"):
            profile_layout(cfg)
        return
    stages = profile_layout(cfg)
    assert [s.stage for s in stages] == [0, 1]
    assert all(s.comm.get("send", 0) > 0 and s.comm.get("recv", 0) > 0 for s in stages)
    assert stages[0].static_bytes != stages[1].static_bytes  # embedding vs head


def test_plan_fake_cli(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml", "--fake"]) == 0
    out = capsys.readouterr().out
    assert "fake / planner: memory" in out and "stage  rank" in out


def test_plan_without_gpus_is_one_line(capsys):
    assert main(["plan", "--config", "configs/tiny.yaml"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["pretrain: error: plan: --gpus is required (except with --fake: the "
                   "config's layout)"]


def test_toy_config_keeps_the_structure():
    from pretrain.planning.fake_step import _toy

    cfg = tiny_config("train.loss_chunk_tokens=16")
    toy = _toy(cfg, 2)
    assert toy.model.num_layers == cfg.model.num_layers and toy.model.loops == cfg.model.loops
    chunks = cfg.train.seq_len // 16
    assert toy.train.seq_len // toy.train.loss_chunk_tokens == chunks
    assert dataclasses.replace(toy.objective) == cfg.objective
