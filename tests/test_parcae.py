"""Parcae (arXiv 2604.12946): the model against its released function, its tensor names both
ways, where its value embeddings sit, its initialisation, its recurrence draw, and training."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pretrain.config import load_config
from pretrain.formats.parcae import from_parcae, to_parcae
from pretrain.model.families.parcae import DECAY, injection_spectral_norm
from pretrain.model.looped import LoopedLM
from pretrain.model.recurrence import Recurrence
from tests.conftest import ROOT
from tests.reference import reference_parcae

CPU = ROOT / "configs/parcae-cpu.yaml"


def _config(*overrides):
    return load_config(CPU, [f"data.paths=[{ROOT / 'data/sample.txt'}]", "data.validation=[]",
                             *overrides])


def _model(*overrides):
    """A parcae model whose every weight is random (the init's zero output projections, unit
    norms and identity B would hide a misplaced weight)."""
    cfg = _config(*overrides)
    torch.manual_seed(cfg.train.seed)
    model = LoopedLM(cfg.model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "o_proj.weight", "down_proj.weight", "injection.B",
                              "injection.A_log", "injection.dt_bias")):
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return cfg, model


def _their_config(m) -> dict:
    return {"num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
            "norm_eps": m.norm_eps, "rope_base": m.rope_theta, "qk_norm": m.qk_norm,
            "n_layers_in_prelude": m.prelude_layers, "n_layers_in_recurrent_block": m.num_layers,
            "n_layers_in_coda": m.coda_layers}


def _ids(b=2, s=20):
    return torch.randint(0, 257, (b, s), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_every_recurrence_equals_the_released_function(kv_heads):
    """Our model, in their tensor names, equals Parcae's forward written from parcae.py
    (prelude with value embeddings, ln_prelude, the diagonal injection, their RoPE on adjacent
    pairs and QK-norm, C, coda, ln_f, the tied head) after every number of recurrences, from
    the same state. fp32; other operation orders (explicit softmax, their RoPE): ~1e-6."""
    cfg, model = _model(f"model.num_kv_heads={kv_heads}", "model.loops=5")
    ids = _ids()
    state = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(4)) * 0.5
    out = model(ids, state=state.transpose(0, 1))
    tensors = to_parcae(cfg.model, model.state_dict())
    for t in range(cfg.model.loops):
        want = reference_parcae(tensors, _their_config(cfg.model), ids, t + 1, state)
        torch.testing.assert_close(out.logits[t].transpose(0, 1), want, rtol=1e-5, atol=1e-5)


def test_their_names_round_trip_exactly():
    cfg, model = _model()
    tensors = to_parcae(cfg.model, model.state_dict())
    assert not any(k.startswith("gate") for k in tensors)  # Parcae has no exit gate
    back = from_parcae(cfg.model, tensors)
    for name, value in model.state_dict().items():
        if not name.startswith("gate."):
            assert torch.equal(back[name], value), name


def test_export_writes_their_names_and_config_and_imports_back_exactly(tmp_path):
    """`pretrain export` of a parcae checkpoint: model.safetensors in their module's names and
    their config.json; their forward restated from those two files alone gives our logits;
    `pretrain import` reads it back to the same weights (the exit gate, which Parcae lacks,
    at 0); a config their format cannot say is refused naming the field."""
    from safetensors.torch import load_file

    from pretrain.checkpoint.offline import load_model
    from pretrain.cli import main
    from pretrain.config import ConfigError
    from pretrain.formats.parcae import model_overrides

    run = tmp_path / "run"
    assert main(["train", "--config", str(CPU), "train.max_steps=2", "train.log_every=1",
                 f"train.out_dir={run}", f"data.paths=[{ROOT / 'data/sample.txt'}]",
                 "data.validation=[]"]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "hf")]) == 0
    tensors = load_file(str(tmp_path / "hf/model.safetensors"))
    c = json.loads((tmp_path / "hf/config.json").read_text())
    assert c["_class_name"] == "ParcaeConfig" and c["n_layers_in_recurrent_block"] == 2
    assert "transformer.adapter.B" in tensors and "value_embeds.5.weight" in tensors
    cfg, model = load_model(run)
    ids = _ids()
    state = torch.randn(2, 20, 64, generator=torch.Generator().manual_seed(4)) * 0.5
    with torch.no_grad():
        ours = model(ids, state=state.transpose(0, 1), loops=3).logits[-1].transpose(0, 1)
    theirs = reference_parcae(tensors, {**c, "rope_base": c["rope_settings"]["rope_base"]},
                              ids, 3, state)
    # their operations restated (explicit softmax, their RoPE): fp32 rounding, ~1e-6
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back = load_model(tmp_path / "back")[1].state_dict()
    for name, value in model.state_dict().items():
        want = torch.zeros_like(value) if name.startswith("gate.") else value
        assert torch.equal(back[name], want), name
    assert c["recurrent_iteration_method"] == "per-sequence"  # configs/parcae-cpu.yaml's
    assert ("recurrence.per_sequence", True) in model_overrides(c)
    for field, value, message in (("recurrent_iteration_method", "per-token", "per-batch or"),
                                  ("num_key_value_heads", 2, "only 4"),
                                  ("injection_type", "linear", "has 'diagonal' only"),
                                  ("n_embd", "64", "expected an integer")):
        with pytest.raises(ConfigError, match=f"^config.json: {field}: .*{message}"):
            model_overrides({**c, field: value})


def test_weight_decay_leaves_the_injection_and_c_alone_as_theirs():
    """Their _no_weight_decay: A_log, dt_bias, B and C; the layers' matrices are decayed."""
    from pretrain.optim import param_groups

    cfg, model = _model()
    decayed = {id(p) for g in param_groups(model, cfg.optim) if g["weight_decay"] > 0
               for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert not names & {"injection.A_log", "injection.dt_bias", "injection.B",
                        "readout_proj.weight"}
    assert "block.0.attn.qkv_proj.weight" in names and cfg.optim.weight_decay > 0


@pytest.mark.parametrize("config, expected", [
    # their rule written out: a table where the layer's index among prelude + block + coda
    # has the last layer's parity, applied where their gate sits (layer ids: prelude i, block
    # P + i, coda P + R_mean * B + i; n_layer = B * mean_backprop_depth = B * 4, even)
    ("parcae-140m.yaml", {"prelude": [1], "block": [1], "coda": [1]}),
    ("parcae-1.3b.yaml", {"prelude": [1, 3, 5, 7], "block": [1, 3, 5, 7], "coda": [1, 3, 5, 7]}),
])
def test_value_embeddings_sit_where_their_two_rules_put_them(config, expected):
    m = load_config(ROOT / "configs" / config, []).model
    p, b, c = m.prelude_layers, m.num_layers, m.coda_layers
    n_eff, n_layer = p + b + c, b * 4

    def theirs(unique, layer_id):
        return unique % 2 == (n_eff - 1) % 2 and layer_id % 2 == (n_layer - 1) % 2

    want = {"prelude": [i for i in range(p) if theirs(i, i)],
            "block": [i for i in range(b) if theirs(p + i, p + i)],
            "coda": [i for i in range(c) if theirs(p + b + i, p + b * m.loops + i)]}
    assert want == expected
    with torch.device("meta"):
        model = LoopedLM(m)
    got = {seg: [i for i, layer in enumerate(getattr(model, seg))
                 if layer.attn.value_embed is not None] for seg in want}
    assert got == expected


def test_the_initialisation_is_theirs():
    """scaled-zero with orthogonal matrices: each of q, k, v and the MLP's up projection an
    orthogonal matrix times std sqrt(max(rows, cols)), output projections zero, A = 1, the
    decay sqrt(1/5), B the identity, C orthogonal."""
    cfg = _config()
    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    std = cfg.model.init_std
    layer = model.block[0]
    for w in (*layer.attn.qkv_proj.weight.split([64, 64, 64]), layer.mlp.up_proj.weight,
              model.readout_proj.weight, model.embed.weight):
        small = min(w.shape)
        gram = (w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T).double()
        scale = std * math.sqrt(max(w.shape))
        # fp32 Householder QR keeps Q orthonormal to ~sqrt(n) eps in practice (n <= 257 rows:
        # ~2e-6) and the fp32 gram adds as much: 1e-5 of scale^2 per entry, with margin
        torch.testing.assert_close(gram, scale ** 2 * torch.eye(small, dtype=torch.float64),
                                   rtol=0, atol=1e-5 * scale ** 2)
    assert not layer.attn.o_proj.weight.any() and not layer.mlp.down_proj.weight.any()
    assert torch.equal(model.injection.B, torch.eye(64)) and not model.injection.A_log.any()
    torch.testing.assert_close(model.injection.decay(), torch.full((64,), DECAY))
    assert injection_spectral_norm(model.injection) == pytest.approx(DECAY)


def test_the_recurrence_draw_is_theirs_and_its_expectation_exact():
    """R = max(Poisson(r), 1) per step, a function of (seed, step); E[R] from the exact pmf."""
    rec = Recurrence.of(_config("recurrence.backprop=4"))
    draws = [rec.draw(1234, step) for step in range(4000)]
    assert draws[:50] == [rec.draw(1234, step) for step in range(50)]
    assert min(draws) >= 1
    mean_r, mean_k = rec.expected()
    p0 = math.exp(-8)
    assert mean_r == pytest.approx(8 + p0, rel=1e-9)  # the zero draws moved to 1
    assert abs(sum(draws) / len(draws) - mean_r) < 4 * math.sqrt(8 / len(draws))
    assert mean_k == pytest.approx(sum(min(r, 4) * math.exp(r * math.log(8) - 8 - math.lgamma(r + 1))
                                       for r in range(1, 80)) + p0 * 1, rel=1e-9)


@pytest.mark.parametrize("objective, loops", [("last", 4), ("all", 4), ("last", 8)])
def test_parcae_plans_its_flops_and_memory(objective, loops):
    """FLOPs: the injection's e B^T (2 H^2) per loop step, C (2 H^2) per readout and the value
    embeddings' gates beside Huginn's adapter (4 H^2 per loop step); activation bytes as counted (every saved
    tensor of a real forward, SavedForBackward) within the activation model's 1%."""
    from pretrain.model.activations import saved_bytes
    from pretrain.model.flops import flops_per_token
    from pretrain.model.memory import MemoryPolicy, SavedForBackward
    from pretrain.model.objective import compute_objective, readout_steps

    fixed = ["recurrence.sampler=fixed", "recurrence.per_sequence=false",
             "recurrence.backprop=0", "train.seq_len=32", f"model.loops={loops}"]
    cfg = _config(*fixed, f"objective.kind={objective}")
    huginn = _config(*fixed, "model.loop_mode=huginn", "model.init=huginn")
    h, reads = cfg.model.hidden_size, readout_steps(objective, loops)
    diff = (flops_per_token(cfg.model, 32, read_count=len(reads))
            - flops_per_token(huginn.model, 32, read_count=len(reads)))
    gate = 2 * 32 * cfg.model.num_kv_heads  # a value embedding's gate: one in each segment
    assert diff == 3 * (loops * (2 * h * h - 4 * h * h) + len(reads) * 2 * h * h
                        + gate * (1 + loops + len(reads)))
    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(3))
    with SavedForBackward(model.parameters()) as c:
        compute_objective(cfg.objective, model(ids, state_seed=1, read_steps=reads), ids)
    planned = saved_bytes(cfg, 3, MemoryPolicy(), read_count=len(reads))
    assert abs(planned / c.bytes - 1) < 0.01, (planned, c.bytes)


@pytest.mark.parametrize("policy", ["full", "last", "average"])
@pytest.mark.parametrize("rule", ["gate:0.55", "kl:0.01", "delta:0.05", "fixed:2", "all"])
def test_parcae_decodes_under_every_exit_rule_and_kv_policy(rule, policy):
    """Decoding through the KV cache (frozen keys of exited tokens, or the one collapsed cache)
    equals re-scoring the whole sequence for every new token, rule by rule (tests/conftest.py's
    parcae variant: a zero initial state, so every call is the same function)."""
    from pretrain.model.generate import ExitRule, generate
    from tests.conftest import VARIANTS, tiny_config
    from tests.test_generate import _spread_gate

    cfg = tiny_config(*VARIANTS["parcae"], "model.loops=4")
    torch.manual_seed(cfg.train.seed)
    model = _spread_gate(LoopedLM(cfg.model).eval())
    prompt = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    runs = [generate(model, prompt, 10, rule=ExitRule.parse(rule), kv_cache=policy,
                     temperature=1.0, use_cache=cache, generator=torch.Generator().manual_seed(6))
            for cache in (True, False)]
    assert torch.equal(runs[0].tokens, runs[1].tokens)
    assert torch.equal(runs[0].loops_used, runs[1].loops_used)
    # cached keys and SDPA's causal mask against an explicit one: fp32 rounding (~1e-6)
    torch.testing.assert_close(runs[0].logits, runs[1].logits, rtol=1e-5, atol=1e-5)
    if rule == "gate:0.55":  # the spread gate exits tokens at several steps: frozen keys
        assert len(set(runs[0].loops_used.flatten().tolist())) > 1


def test_the_cpu_config_trains_and_logs_the_injections_spectral_norm(tmp_path):
    """configs/parcae-cpu.yaml as shipped (R drawn per step, k = 4) for 30 steps: the loss
    falls, and every logged step carries the injection's spectral norm, below 1 (a
    contraction by construction) and equal to the trained weights' largest decay."""
    from pretrain.train import Trainer

    cfg = _config("train.max_steps=30", "train.log_every=10", f"train.out_dir={tmp_path}")
    trainer = Trainer(cfg, log=lambda _: None, tensorboard=False)
    history = trainer.fit(save=False).history
    assert history[-1]["train/loss"] < history[0]["train/loss"] - 0.5
    norms = [s["family/injection_spectral_norm"] for s in history]
    assert len(norms) == 3 and all(0 < n < 1 for n in norms)
    assert norms[-1] == pytest.approx(injection_spectral_norm(trainer.model.injection), rel=1e-6)
    assert len({s["train/loops"] for s in history}) > 1


def test_a_depth_per_sequence_is_each_sequence_run_alone_at_its_depth():
    """recurrence.per_sequence (their released "per-sequence"): a batch whose samples draw
    their own depths T_i (n_i without a graph, k_i with one) gives each sample the logits and
    the loss gradient of that sample run alone for T_i steps, backpropagating through k_i --
    the batch runs max T_i steps, a sample idling through the first steps of each phase."""
    from pretrain.model.objective import compute_objective

    cfg, model = _model("recurrence.per_sequence=true", "model.state_std=0.3",
                        "recurrence.backprop=4")
    plan = Recurrence.of(cfg).plan(1234, 5, 0, 1, 6)
    (depths,), (seeds,) = plan.depths, plan.state_seeds
    totals = [n + k for n, k in depths]
    assert plan.loops == max(totals) and len(set(totals)) > 2 and min(totals) < plan.loops
    assert all(k == min(tot, 4) for (n, k), tot in zip(depths, totals, strict=True))
    ids, labels = _ids(6, 12), _ids(6, 12).roll(1, 1)
    out = model(ids, loops=plan.loops, backprop=plan.backprop, state_seed=seeds, depths=depths)
    compute_objective(cfg.objective, out, labels).loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    alone = []
    for i, (n, k) in enumerate(depths):
        one = model(ids[i:i + 1], loops=n + k, backprop=k, state_seed=(seeds[i],))
        alone.append(one.logits[-1])
        (compute_objective(cfg.objective, one, labels[i:i + 1]).loss / len(depths)).backward()
    # every sample's tokens count alike in the batch's mean CE; the batch runs each matmul at
    # another shape (other BLAS blocking): fp32 rounding, ~1e-6 relative
    torch.testing.assert_close(out.logits[-1], torch.cat(alone, dim=1), rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        if p.grad is not None:
            # a gradient sums six samples' contributions in another order (one batch against
            # six runs added up): relative rounding grows where they nearly cancel -- 1e-4
            # relative, 1e-6 absolute for entries near zero
            torch.testing.assert_close(got[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_depth_per_sequence_is_the_same_under_any_data_parallel_split():
    rec = Recurrence.of(_config("recurrence.per_sequence=true", "recurrence.backprop=4"))
    one = rec.plan(1234, 3, 0, 2, 4)
    two = [rec.plan(1234, 3, r, 2, 2, dp_size=2) for r in range(2)]
    assert {p.loops for p in two} == {one.loops}
    assert [d for p in two for mb in p.depths for d in mb] == [d for mb in one.depths for d in mb]
    # E[R] of a step is E[max of its samples' draws]: against the draws of 2000 steps of 8
    steps = [rec.plan(7, s, 0, 1, 8).loops for s in range(2000)]
    mean_r, mean_k = rec.expected(batch=8)
    spread = (sum((r - mean_r) ** 2 for r in steps) / len(steps)) ** 0.5
    assert abs(sum(steps) / len(steps) - mean_r) < 4 * spread / len(steps) ** 0.5
    assert mean_r > rec.expected()[0] + 2 and mean_k == pytest.approx(4.0, abs=1e-3)


def test_a_depth_per_sequence_is_refused_where_it_cannot_hold():
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="^objective.kind: all: with recurrence.per_sequence"):
        _config("recurrence.per_sequence=true", "objective.kind=all")
    with pytest.raises(ConfigError, match="^recurrence.per_sequence: draws each sequence"):
        _config("recurrence.per_sequence=true", "recurrence.sampler=fixed")
    from tests.conftest import tiny_config

    with pytest.raises(ConfigError, match="^recurrence.per_sequence: the ouro family's loop steps differ"):
        tiny_config("recurrence.per_sequence=true", "recurrence.sampler=poisson",
                    "objective.kind=last")


# the tiny shape the multi-process checks share, as Parcae: two block layers so every segment
# has a value embedding (prelude 1, block 1, coda 1), the block's on pipeline stage 1; the head
# tied to the embedding as every release (both ends of the ring hold it)
PARCAE = ["model.loop_mode=parcae", "model.prelude_layers=2", "model.coda_layers=2",
          "model.num_layers=2", "model.sandwich_norm=false", "model.qk_norm=true",
          "model.mlp=relu2_half", "model.init=parcae", "model.init_std=0.08",
          "model.state_std=0.08", "objective.kind=last", "model.tie_embeddings=true"]


def test_the_tiny_parallel_shape_has_a_value_embedding_in_every_segment():
    from tests.conftest import tiny_config

    with torch.device("meta"):
        model = LoopedLM(tiny_config("model.vocab_size=260", *PARCAE, "model.loops=3").model)
    assert [[layer.attn.value_embed is not None for layer in getattr(model, seg)]
            for seg in ("prelude", "block", "coda")] == [[False, True]] * 3


@pytest.mark.multiproc
def test_parcae_trains_under_tp2_sp_pp2_and_zero1(tmp_path):
    """PP = 2 x TP = 2 with sequence parallelism: gradients of every shard equal the single
    process's (a fixed R, and R = 3 with backprop through 2), and three trainer steps with R
    drawn per step and k = 2 give its losses -- and with a depth drawn per sequence (the
    ring's laps keeping each micro-batch's phase start on stage 0); PP = 2 x DP = 2 with
    ZeRO-1, likewise."""
    from tests.distributed import torchrun
    from tests.multiproc.compare import assert_family_run

    for layout in ("tp", "zero"):
        out = tmp_path / f"{layout}.json"
        torchrun(4, "-m", "tests.test_parcae", "--out", str(out), "--layout", layout)
        res = json.loads(out.read_text())
        assert len(res) == 4 and len(set(res[0]["train"]["loops"])) > 1
        assert_family_run(res, steps=3)

def _worker() -> None:
    import argparse
    import os
    import tempfile

    import torch.distributed as dist

    from parallelism.topology import init_topology
    from tests.conftest import tiny_config
    from tests.multiproc import pp_equivalence as pp
    from tests.multiproc.compare import finish, trainer_losses

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layout", choices=("tp", "zero"), required=True)
    args = ap.parse_args()
    layout = (["parallel.tensor=2", "parallel.sequence_parallel=true"] if args.layout == "tp"
              else ["parallel.data=2", "parallel.zero_stage=1"])
    base = [*pp.SHAPES, *PARCAE, "parallel.pipeline=2", "parallel.pipeline_split=[1,1]"]
    topo = init_topology(tiny_config(*base, *layout, "train.grad_accum_steps=2"))
    results = {}
    if args.layout == "tp":
        pp.VARIANTS["parcae"] = pp.WINDOW_VARIANTS["parcae"] = PARCAE
        results = {"R3": pp.one_case(topo, 3, 2, "1f1b", "parcae", [1, 1], sp=True),
                   "R3k2": pp.one_case(topo, 3, 2, "1f1b", "parcae", [1, 1], sp=True, backprop=2)}
    run = [*pp.SHAPES, *PARCAE, "model.loops=3", "recurrence.sampler=poisson",
           "recurrence.backprop=2", "train.max_steps=3", "train.log_every=1",
           "optim.warmup_steps=0", "train.grad_accum_steps=2", "train.micro_batch_size=4",
           f"train.out_dir={tempfile.mkdtemp(prefix='parcae-train-')}"]
    dp = 2 if args.layout == "zero" else 1
    for case, extra in (("train", []), ("train_per_sequence", ["recurrence.per_sequence=true",
                                                              "model.loops=5"])):
        results[case] = trainer_losses(topo, [*run, *extra], [
            "parallel.pipeline=2", "parallel.pipeline_split=[1,1]", *layout,
            f"train.micro_batch_size={4 // dp}"])
    gathered = [None] * int(os.environ["WORLD_SIZE"])
    dist.all_gather_object(gathered, results)
    finish(topo, gathered, args.out)


if __name__ == "__main__":
    _worker()
