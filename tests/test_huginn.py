"""Huginn-0125's recurrent depth (arXiv 2502.05171): the model against its released function,
its format both ways, the per-step recurrence sampler, truncated backprop and KL exits."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from pretrain.config import ConfigError
from pretrain.formats.huginn import from_huginn, huginn_config, to_huginn
from pretrain.model.generate import ExitRule, generate, readout_exit_steps
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import compute_objective
from pretrain.model.recurrence import Recurrence, backprop_count
from pretrain.train import Trainer
from tests.conftest import VARIANTS, tiny_config
from tests.reference import reference_huginn

H = 64
# the released format's shape rules: full multi-head attention, the width-derived scales
RELEASED = [*VARIANTS["huginn"], "model.num_kv_heads=4", f"model.embed_scale={math.sqrt(H)}",
            f"model.state_std={math.sqrt(2 / (5 * H))}", "model.prelude_layers=2",
            "model.coda_layers=2", "model.loops=5"]


def _model(*overrides, perturb=True):
    """A huginn model whose every weight is random (the init's zero biases and unit norms would
    hide a misplaced bias or norm)."""
    cfg = tiny_config(*overrides)
    torch.manual_seed(cfg.train.seed)
    model = LoopedLM(cfg.model)
    if perturb:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("norm.weight", "qk_bias")):
                    p.copy_(1.0 * name.endswith("weight") + 0.3 * torch.randn(p.shape, generator=g))
    return cfg, model


def _ids(b=2, s=20):
    return torch.randint(0, 257, (b, s), generator=torch.Generator().manual_seed(1))


def test_every_recurrence_equals_the_released_function():
    """Our model, exported to their tensor names, equals Huginn's forward written from
    raven_modeling_minimal.py (their RoPE on adjacent pairs, their SandwichBlock, ln_f -> coda
    -> ln_f, the embedding scale) after every number of recurrences, from the same state.
    fp32; other operation orders (explicit softmax, their RoPE): ~1e-6 relative."""
    cfg, model = _model(*RELEASED)
    ids = _ids()
    state = torch.randn(2, 20, H, generator=torch.Generator().manual_seed(4)) * 0.5
    out = model(ids, state=state.transpose(0, 1))
    tensors = to_huginn(cfg.model, model.state_dict())
    c = huginn_config(cfg)
    for t in range(cfg.model.loops):
        want = reference_huginn(tensors, c, ids, t + 1, state)
        torch.testing.assert_close(out.logits[t].transpose(0, 1), want, rtol=1e-5, atol=1e-5)


def test_format_round_trip_is_exact_and_refuses_what_it_cannot_say():
    cfg, model = _model(*RELEASED)
    tensors = to_huginn(cfg.model, model.state_dict())
    assert not any(k.startswith("gate") for k in tensors)  # Huginn has no exit gate
    assert tensors["freqs_cis"].shape == (1, cfg.model.max_seq_len, 1, 8, 2)
    back = from_huginn(cfg.model, tensors)
    for name, value in model.state_dict().items():
        if not name.startswith("gate."):
            assert torch.equal(back[name], value), name
    for bad, field in (("model.embed_scale=2", "model.embed_scale"),
                       ("model.num_kv_heads=2", "model.num_kv_heads"),
                       ("model.sandwich_style=ouro", "model.sandwich_style")):
        other, m = _model(*RELEASED, bad, perturb=False)
        with pytest.raises(ConfigError, match=f"^{field}: .*Huginn's format"):
            to_huginn(other.model, m.state_dict())


def test_the_state_is_drawn_from_its_seed_truncated_and_scaled():
    cfg, model = _model(*RELEASED)
    run = model.begin(_ids(), state_seed=9)
    draw = model.family.initial_state
    a, b = draw(run, torch.device("cpu")), draw(run, torch.device("cpu"))
    assert torch.equal(a, b) and a.shape == (20, 2, H)
    std, scale = cfg.model.state_std, cfg.model.embed_scale
    assert a.abs().max() <= 3 * std * scale * (1 + 1e-6)  # cut at +-3 std, then scaled
    assert a.std().item() == pytest.approx(std * scale * 0.986, rel=0.05)  # truncated normal's std
    other = model.begin(_ids(), state_seed=10)
    assert not torch.equal(a, draw(other, torch.device("cpu")))


def test_sampler_is_a_function_of_seed_and_step_with_huginns_mean():
    rec = Recurrence.of(tiny_config("recurrence.sampler=poisson_lognormal", "model.loops=32",
                                    "recurrence.backprop=8"))
    draws = [rec.draw(1234, s) for s in range(4000)]
    assert draws == [rec.draw(1234, s) for s in range(4000)]  # every rank, every resume
    assert draws != [rec.draw(1235, s) for s in range(4000)]
    assert min(draws) >= 1
    mean_r, mean_k = rec.expected()
    # E[R] = E[rate] + 1 = 33: the sample mean of 4000 draws within 4 standard errors
    assert mean_r == pytest.approx(33.0, abs=1e-4)
    assert abs(statistics.mean(draws) - mean_r) < 4 * statistics.stdev(draws) / math.sqrt(4000)
    ks = [backprop_count(r, 8) for r in draws]
    assert abs(statistics.mean(ks) - mean_k) < 4 * statistics.stdev(ks) / math.sqrt(4000)
    assert 7.5 < mean_k < 8  # R < 8 is rare at mean 33
    fixed = Recurrence.of(tiny_config("model.loops=4"))
    assert {fixed.draw(0, s) for s in range(10)} == {4}
    assert fixed.expected() == (4.0, 4.0)
    assert Recurrence.of(tiny_config("model.loops=4", "recurrence.backprop=3")).expected() == (4.0, 3.0)
    plan = rec.plan(1234, 7, dp_rank=0, micro_batches=3)
    assert plan.loops == draws[7] and plan.backprop == min(8, draws[7])
    assert len(set(plan.state_seeds)) == 3


def test_a_samples_initial_state_seed_does_not_depend_on_the_layout():
    """The step's 8 samples in global order: one rank with 2 micro-batches of 4, or 2
    data-parallel ranks with 2 micro-batches of 2 each (data_pipeline/loader.py's order)."""
    rec = Recurrence.of(tiny_config(*RELEASED, "recurrence.backprop=2"))

    def seeds(dp, micro_batches, size):
        return [s for r in range(dp) for mb in
                rec.plan(1234, 3, r, micro_batches, size).state_seeds for s in mb]

    one = seeds(1, 2, 4)
    assert len(set(one)) == 8 and seeds(2, 2, 2) == one == seeds(4, 1, 2) == seeds(1, 8, 1)


@pytest.mark.parametrize("variant,kind", [("huginn", "last"), ("ouro", "elbo"),
                                          ("flt_recipe", "all")])
def test_truncated_backprop_equals_detaching_before_the_window(variant, kind):
    """k = 2 of R = 5: the loss is the full objective; gradients equal a forward built by hand
    that detaches the state entering the window and every earlier readout."""
    overrides = [*VARIANTS[variant], f"objective.kind={kind}", "model.loops=5",
                 "model.state_std=0.08" if variant == "huginn" else "model.loops=5"]
    cfg, model = _model(*overrides, perturb=variant == "huginn")
    ids, labels = _ids(), _ids().roll(1, 1)
    out = model(ids, backprop=2, state_seed=3)
    loss = compute_objective(cfg.objective, out, labels).loss
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    run = model.begin(ids, state_seed=3)
    e = model.embed_stream(ids, run)
    handover, steps = None, []
    for t in range(5):
        if t == 3:
            handover = handover.detach()
        x, h = model.loop_input(t, e, handover, run)
        if t == 3 and h is not None:
            h = h.detach()
        step = model.end_loop(t, model.run_block(t, x, h, run), run)
        if t < 3:
            step.logits = None if step.logits is None else step.logits.detach()
            step.gate_logits = step.gate_logits.detach()
        steps.append(step)
        handover = step.handover
    out = model.output([s.logits for s in steps], torch.stack([s.gate_logits for s in steps]),
                       torch.stack([s.stream_norm() for s in steps]))
    want_loss = compute_objective(cfg.objective, out, labels).loss
    assert torch.equal(loss.detach(), want_loss.detach())
    want_loss.backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(want)
    for name in want:
        # the same operations in the same order: equal up to fp32 summation order in autograd
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)


def test_resume_draws_the_same_recurrence_sequence(tmp_path):
    recipe = [*VARIANTS["huginn"], "model.state_std=0.08", "recurrence.sampler=poisson_lognormal",
              "model.loops=3", "recurrence.backprop=2", "train.max_steps=6", "train.log_every=1",
              "train.checkpoint_every=3", "model.vocab_size=260", "train.seq_len=32"]

    def trainer(out):
        return Trainer(tiny_config(*recipe, out_dir=out), log=lambda _: None, tensorboard=False)

    full = trainer(tmp_path / "a").fit().history
    resumed = trainer(tmp_path / "b")
    resumed.resume(str(tmp_path / "a/checkpoints/step_0000003"))
    again = resumed.fit().history
    for key in ("train/loss", "train/loops", "train/backprop_loops", "loop/ce_last"):
        assert [h[key] for h in again] == [h[key] for h in full[3:]], key
    loops = [h["train/loops"] for h in full]
    assert len(set(loops)) > 1 and loops == [resumed.recurrence.draw(1234, s)
                                              for s in range(6)]


def test_kl_exit_is_huginns_criterion():
    """KL(p_{t-1} || p_t) < eps, the first step against the uniform distribution; kl:0 never
    exits early; a loose threshold exits earlier than the last step for some tokens."""
    assert str(ExitRule.parse("kl:5e-4")) == "kl:0.0005"
    logits = [torch.randn(6, 3, 11, generator=torch.Generator().manual_seed(t)) for t in range(4)]
    gates = torch.zeros(4, 6, 3)
    prev = torch.full((6, 3, 11), -math.log(11))
    kls = []
    for lg in logits:
        lp = torch.log_softmax(lg, -1)
        kls.append((prev.exp() * (prev - lp)).sum(-1))
        prev = lp
    eps = float(torch.stack(kls).median())
    steps = readout_exit_steps(ExitRule("kl", eps), gates, logits=logits)
    want = torch.full((6, 3), 3)
    for t in reversed(range(4)):
        want = torch.where(kls[t] < eps, t, want)
    assert torch.equal(steps, want) and (steps < 3).any()
    with pytest.raises(ValueError, match="needs every step's logits"):
        readout_exit_steps(ExitRule("kl", eps), gates)
    _, model = _model(*VARIANTS["huginn"], "model.loops=6")
    model.eval()
    torch.manual_seed(0)
    never = generate(model, _ids(1, 8), 6, rule=ExitRule("kl", 0.0))
    assert (never.loops_used == 6).all()
    torch.manual_seed(0)
    loose = generate(model, _ids(1, 8), 6, rule=ExitRule("kl", 10.0))
    assert (loose.loops_used == 1).all()  # any step is within KL 10 of uniform at this size


def test_flops_count_a_no_graph_recurrence_as_one_forward():
    """A recurrence without a graph costs its forward F; one with a graph 3F (forward +
    backward); the run's count takes E[R] and E[k] of the sampler. Hand count of the tiny
    huginn model (prelude 1, coda 1, the last step read out, gate untrained)."""
    from pretrain.model.flops import flops_per_token, run_flops_per_token

    cfg = tiny_config(*VARIANTS["huginn"], "model.loops=5", "recurrence.backprop=2")
    m, s = cfg.model, cfg.train.seq_len
    h, f, v, d = m.hidden_size, m.ffn_hidden_size, m.vocab_size, m.kv_channels
    layer = 2 * (h * d * (2 * m.num_heads + 2 * m.num_kv_heads) + 3 * h * f) + 4 * s * m.num_heads * d
    rec = m.num_layers * layer + 2 * 2 * h * h  # the shared block + the adapter
    head = layer + 2 * h * v  # coda + LM head, once (the last step)
    want = 3 * layer + 5 * rec + 2 * 2 * rec + 3 * head + 2 * h  # gate: forward only
    assert flops_per_token(m, s, loops=5, read_count=1, train_gate=False, backprop=2) == want
    assert run_flops_per_token(cfg) == want
    sampled = tiny_config(*VARIANTS["huginn"], "model.loops=5", "recurrence.backprop=2",
                          "recurrence.sampler=poisson_lognormal")
    mean_r, mean_k = Recurrence.of(sampled).expected()
    assert run_flops_per_token(sampled) == pytest.approx(
        3 * layer + mean_r * rec + 2 * mean_k * rec + 3 * head + 2 * h, rel=1e-12)


def test_init_is_theirs():
    """`model.init: huginn` draws as their `_init_weights`: truncated normals cut at +-3 std,
    std = sqrt(2 / (5 H)) for the embedding, q|k|v, the MLP's gate half and the adapter, and
    std / sqrt(2 * effective depth) -- prelude + R x block + coda -- for the output projections
    and the MLP's up half. A truncated normal's std is 0.98658 of its parameter's; each sample
    holds >= 16k values, so the sample std sits within ~1% of it (4.4 standard errors at 2%)."""
    h, f = 128, 512
    cfg = tiny_config("model.loop_mode=huginn", f"model.hidden_size={h}",
                      f"model.ffn_hidden_size={f}", "model.prelude_layers=2",
                      "model.coda_layers=2", "model.num_layers=4", "model.loops=8",
                      "model.init=huginn", f"model.init_std={math.sqrt(2 / (5 * h))}")
    model = LoopedLM(cfg.model)
    std = math.sqrt(2 / (5 * h))
    out = std / math.sqrt(2 * (2 + 8 * 4 + 2))
    layer = model.block[1]
    gate, up = layer.mlp.gate_up_proj.weight.detach().chunk(2)
    samples = {"embed": (model.embed.weight, std), "qkv": (layer.attn.qkv_proj.weight, std),
               "adapter": (model.adapter.weight, std), "gate half": (gate, std),
               "up half": (up, out), "o_proj": (layer.attn.o_proj.weight, out),
               "down_proj": (layer.mlp.down_proj.weight, out)}
    for name, (w, sd) in samples.items():
        w = w.detach()
        assert w.abs().max() <= 3 * sd, name
        assert w.std().item() == pytest.approx(0.98658 * sd, rel=0.02), name
    default = LoopedLM(tiny_config("model.loop_mode=huginn", f"model.hidden_size={h}",
                                   f"model.ffn_hidden_size={f}").model)
    assert default.embed.weight.abs().max() > 3 * 0.02  # `normal` is untruncated


def test_import_keeps_their_init():
    from pretrain.formats.huginn import model_overrides

    c = huginn_config(tiny_config(*RELEASED))
    got = dict(model_overrides(c))
    assert got["model.init"] == "huginn" and got["model.init_std"] == pytest.approx(math.sqrt(2 / (5 * H)))
