"""What backward keeps (pretrain/model/memory.py): activation recompute and the deferred,
chunked readout change no value, and the planner's activation model (model/activations.py)
predicts the bytes they keep, counted exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from pretrain.model.activations import saved_bytes
from pretrain.model.looped import LoopedLM
from pretrain.model.memory import MemoryPolicy, SavedForBackward
from pretrain.model.objective import compute_objective, readout_steps
from tests.conftest import DEVICES, VARIANTS, tiny_config

POLICIES = {"selective": MemoryPolicy("selective"), "full": MemoryPolicy("full"),
            "loops-k1": MemoryPolicy("loops", 1), "loops-k0": MemoryPolicy("loops", 0)}
MODES = ["ouro", "lt_i", "lt_ia", "flt_recipe", "flt_res"]


def _batch(cfg, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.model.vocab_size, (3, 32), generator=g)
    labels = torch.randint(0, cfg.model.vocab_size, (3, 32), generator=g)
    labels[0, :5] = -100
    return ids, labels


def _loss_and_grads(cfg, model, policy, ids, labels):
    model = copy.deepcopy(model)
    model.set_memory(policy)
    torch.manual_seed(5)  # dropout draws the same masks in the recomputed forward
    loss = compute_objective(cfg.objective, model(ids), labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [*MODES, "parcae"])
@pytest.mark.parametrize("policy", POLICIES)
def test_recompute_gradients_bit_equal(variant, policy, device):
    """Every recompute mode, every loop mode, with dropout: the same loss and gradients, bit
    for bit (fp32; deterministic kernels on CUDA), as keeping every activation."""
    cfg = tiny_config(*VARIANTS[variant], "model.dropout=0.1", "model.loops=4")
    model = LoopedLM(cfg.model).to(device)
    ids, labels = (x.to(device) for x in _batch(cfg))
    loss0, grads0 = _loss_and_grads(cfg, model, MemoryPolicy(), ids, labels)
    loss, grads = _loss_and_grads(cfg, model, POLICIES[policy], ids, labels)
    assert torch.equal(loss, loss0)
    assert grads.keys() == grads0.keys()
    for name, g in grads.items():
        assert torch.equal(g, grads0[name]), name


@pytest.mark.parametrize("variant,kind", [("ouro", "elbo"), ("flt_recipe", "last"),
                                          ("flt_recipe", "few"), ("ouro", "adaptive_gate")])
@pytest.mark.parametrize("chunk", [7, 32, 1000])
@pytest.mark.parametrize("device", DEVICES)
def test_chunked_readout_equals_whole_logits(variant, kind, chunk, device):
    """The deferred readout, in chunks that do not divide the sequence, one chunk, and more
    than the sequence: the same loss and per-step CE, gradients within fp32 rounding (the
    head's weight gradient sums its chunks in another order)."""
    cfg = tiny_config(*VARIANTS[variant], f"objective.kind={kind}", "model.loops=3")
    model = LoopedLM(cfg.model).to(device)
    ids, labels = (x.to(device) for x in _batch(cfg))
    loss0, grads0 = _loss_and_grads(cfg, model, MemoryPolicy(), ids, labels)
    loss, grads = _loss_and_grads(cfg, model, MemoryPolicy(chunk_rows=chunk), ids, labels)
    torch.testing.assert_close(loss, loss0, rtol=1e-6, atol=0)
    assert grads.keys() == grads0.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, grads0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_readout_keeps_no_logits():
    """The deferred readout keeps none of the R logits tensors for backward."""
    cfg = tiny_config("model.loops=4", "model.vocab_size=4096")
    model = LoopedLM(cfg.model)
    ids, labels = _batch(cfg)
    counts = {}
    for chunk in (0, 16):
        model.set_memory(MemoryPolicy(chunk_rows=chunk))
        with SavedForBackward(model.parameters()) as c:
            compute_objective(cfg.objective, model(ids), labels)
        counts[chunk] = c.bytes
    logits = 4 * ids.numel() * cfg.model.vocab_size * 4
    assert counts[0] - counts[16] >= logits  # all R steps' fp32 log-softmax are gone


@pytest.mark.parametrize("variant", [*MODES, "huginn", "parcae", "flt_recipe_qk", "relu2_plain"])
@pytest.mark.parametrize("policy", ["none", "selective", "full", "loops-k1", "chunked"])
def test_planner_predicts_saved_bytes(variant, policy):
    """model/activations.py against the exact count, within 10%, for every loop family, norm
    and MLP variant and every policy (bench/activation_memory.py: a 25M model, TP, PP); the
    forward reads out the steps the objective trains, as the step engine's does."""
    extra = {"flt_recipe_qk": [*VARIANTS["flt_recipe"], "model.qk_norm=true"],
             "relu2_plain": ["model.mlp=relu2", "model.sandwich_norm=false"]}
    cfg = tiny_config(*(extra.get(variant) or VARIANTS[variant]), "model.loops=4",
                      "train.seq_len=32", "train.micro_batch_size=3")
    pol = {"none": MemoryPolicy(), "chunked": MemoryPolicy(chunk_rows=8),
           **POLICIES}[policy]
    model = LoopedLM(cfg.model)
    model.set_memory(pol)
    ids, labels = _batch(cfg)
    steps = readout_steps(cfg.objective.kind, 4)
    with SavedForBackward(model.parameters()) as c:
        compute_objective(cfg.objective, model(ids, read_steps=steps), labels)
    predicted = saved_bytes(cfg, 3, pol, read_count=len(steps))
    assert abs(predicted / c.bytes - 1) < 0.10, (predicted, c.bytes)


def test_recompute_follows_the_loop_count_the_forward_was_called_with():
    """`recompute: loops` keeps the last k loops of the forward at hand: a model configured
    for 4 loops called with loops=2 keeps exactly what a 2-loop model keeps (reading the
    configured count, it would recompute both of them)."""
    four, two = (tiny_config("model.loops=4"), tiny_config("model.loops=2"))
    ids, labels = _batch(four)
    policy = MemoryPolicy("loops", 1)
    counted = []
    for cfg, loops in ((four, 2), (two, None)):
        model = LoopedLM(cfg.model)
        model.set_memory(policy)
        with SavedForBackward(model.parameters()) as c:
            compute_objective(cfg.objective, model(ids, loops=loops), labels)
        counted.append(c.bytes)
    assert counted[0] == counted[1]
    none = LoopedLM(two.model)
    with SavedForBackward(none.parameters()) as c:
        compute_objective(two.objective, none(ids), labels)
    assert counted[1] < c.bytes  # loop 1 of 2 is recomputed: the check can tell
