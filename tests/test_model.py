from __future__ import annotations

import pytest
import torch

from pretrain.config import load_config
from pretrain.model.flops import count_parameters, flops_per_token
from pretrain.model.looped import LoopedLM
from tests.conftest import ROOT, VARIANTS, tiny_config
from tests.reference import reference_forward


def _model(*overrides):
    cfg = tiny_config(*overrides)
    torch.manual_seed(cfg.train.seed)
    return LoopedLM(cfg.model)


def _ids(model, b=2, s=24):
    return torch.randint(0, model.cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_r1_equals_plain_transformer(variant):
    """R=1: the looped model is exactly a plain decoder-only transformer with the same weights."""
    model = _model("model.loops=1", *VARIANTS[variant])
    ids = _ids(model)
    out = model(ids)
    ref_logits, ref_gate = reference_forward(model, ids)
    assert len(out.logits) == 1
    # tests/reference.py restates the equations with other operations (explicit softmax
    # attention, its own norms): fp32 rounding, ~1e-6 relative through R loops
    torch.testing.assert_close(out.logits[0], ref_logits[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.gate_logits, ref_gate, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("loops", [2, 4])
def test_every_loop_step_matches_reference(variant, loops):
    """All R steps (fully-looped averaging and attention injection included) match the
    equations written out independently in tests/reference.py."""
    model = _model(f"model.loops={loops}", *VARIANTS[variant])
    ids = _ids(model)
    out = model(ids)
    ref_logits, ref_gate = reference_forward(model, ids)
    assert len(out.logits) == loops
    # tests/reference.py restates the equations with other operations (explicit softmax
    # attention, its own norms): fp32 rounding, ~1e-6 relative through R loops
    for got, want in zip(out.logits, ref_logits, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.gate_logits, ref_gate, rtol=1e-5, atol=1e-5)


def test_loop_modes_share_weights_and_differ_where_the_papers_say():
    """Same weights, six functions: loop 1 is one plain pass in every mode (on nu(e) outside
    ouro), later loops differ by mode; ouro feeds the *normed* state to the next loop."""
    base = _model("model.loops=3")
    ids = _ids(base)
    outs = {}
    for mode in ("ouro", "lt", "lt_i", "lt_ia", "flt", "flt_res"):
        m = _model("model.loops=3", f"model.loop_mode={mode}")
        m.load_state_dict(base.state_dict())
        outs[mode] = m(ids).logits
    for mode in ("lt_i", "lt_ia", "flt", "flt_res"):
        torch.testing.assert_close(outs[mode][0], outs["lt"][0])
    assert not torch.allclose(outs["ouro"][0], outs["lt"][0])  # e, not nu(e), enters loop 1
    finals = [outs[m][2] for m in outs]
    for i in range(len(finals)):
        for j in range(i):
            assert not torch.allclose(finals[i], finals[j], atol=1e-4)
    # ouro loop 2 == one plain pass over N(x_1) with the same weights
    one = _model("model.loops=1")
    one.load_state_dict(base.state_dict())
    run = one.begin(ids)
    h1 = one.norm(one.run_block(0, one.embed(ids.t()), None, run))
    x2 = one.run_block(1, h1, None, run)
    torch.testing.assert_close(one.lm_head(one.norm(x2)), outs["ouro"][1])


def test_removed_switches_name_their_replacement():
    from pretrain.config import ConfigError

    for key in ("fully_looped", "attention_injection"):
        with pytest.raises(ConfigError, match=f"^model.{key}: removed: .*model.loop_mode="):
            tiny_config(f"model.{key}=true")
        assert tiny_config(f"model.{key}=false").model.loop_mode == "ouro"  # older checkpoints
    with pytest.raises(ConfigError, match="^model.loop_mode: expected one of .*'ouro'.*, got 'fully'"):
        tiny_config("model.loop_mode=fully")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_causal(variant):
    model = _model(*VARIANTS[variant])
    ids = _ids(model)
    changed = ids.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % model.cfg.vocab_size
    a, b = model(ids), model(changed)
    for la, lb in zip(a.logits, b.logits, strict=True):
        torch.testing.assert_close(la[:12], lb[:12])
        assert not torch.allclose(la[12:], lb[12:])


def test_tied_embeddings_share_one_tensor():
    model = _model("model.tie_embeddings=true")
    assert model.lm_head.weight is model.embed.weight
    untied = count_parameters(_model().cfg)
    tied = count_parameters(model.cfg)
    assert untied["total"] - tied["total"] == 257 * 64


def _hand_count(m) -> int:
    """Parameter count from the architecture's shapes, written out independently."""
    d = m.kv_channels
    attn = m.hidden_size * d * (2 * m.num_heads + 2 * m.num_kv_heads)  # q, o; k, v
    attn += (m.num_heads + m.num_kv_heads) * d * m.qk_bias  # Huginn's query/key bias
    mlp = (3 if m.mlp == "swiglu" else 2) * m.hidden_size * m.ffn_hidden_size
    norms = (4 if m.sandwich_norm else 2) * m.hidden_size * m.norm_weights
    layers = (m.num_layers + m.prelude_layers + m.coda_layers) * (attn + mlp + norms)
    emb = m.vocab_size * m.hidden_size * (1 if m.tie_embeddings else 2)
    adapter = 2 * m.hidden_size * m.hidden_size * (m.loop_mode == "huginn")  # Linear 2H -> H
    if m.loop_mode == "parcae":  # A_log, dt_bias, B; C; the prelude norm; one value embedding
        # (table, gate) per segment in the shapes counted here (the second layer of each)
        h, kv = m.hidden_size, m.num_kv_heads * d
        adapter = 2 * h + h * h + h * h + h + 3 * (m.vocab_size * kv + 32 * m.num_kv_heads)
    return layers + emb + adapter + m.hidden_size * m.norm_weights + (m.hidden_size + 1)  # final norm, gate


@pytest.mark.parametrize("name,nominal", [("ouro-1.4b", 1.4e9), ("ouro-2.6b", 2.6e9)])
def test_ouro_parameter_counts(name, nominal):
    """Counts of the published Ouro shapes. The released configs (untied 49152x2048 embeddings
    and head) give 1.4347e9 and 2.6680e9, i.e. +2.5% / +2.6% over the marketing names."""
    cfg = load_config(ROOT / f"configs/{name}.yaml")
    counts = count_parameters(cfg.model)
    assert counts["total"] == _hand_count(cfg.model)
    assert abs(counts["total"] / nominal - 1) < 0.03
    assert counts["non_embedding"] == counts["total"] - 2 * 49152 * 2048
    assert counts["looped_block"] == cfg.model.num_layers * (
        4 * 2048 * 2048 + 3 * 2048 * 5632 + 4 * 2048)


def test_tiny_count_matches_module_and_flops_scale_with_loops():
    for variant in VARIANTS.values():
        model = _model(*variant)
        assert count_parameters(model.cfg)["total"] == sum(p.numel() for p in model.parameters())
        assert count_parameters(model.cfg)["total"] == _hand_count(model.cfg)
    cfg = load_config(ROOT / "configs/ouro-1.4b.yaml").model
    f4, f8 = flops_per_token(cfg, 4096, 4), flops_per_token(cfg, 4096, 8)
    # 6 N_block per loop dominates: doubling R nearly doubles FLOPs (the embedding is free)
    assert 1.95 < f8 / f4 <= 2.0
    six_n = 6 * count_parameters(cfg)["non_embedding"] * 4
    assert six_n < f4 < 1.5 * six_n


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_decoding_ends_every_loop_step_as_training_does(variant):
    """Prefill (model/generate.py) and training's forward both end each loop step through
    `end_loop`: the same per-step logits and gates for every loop mode (the handover shows in
    steps 2 and 3, the no-norm ablation included). Same operations in the same order; the
    tolerance covers SDPA's causal mask against the cache path's explicit one (rounding)."""
    from pretrain.model.generate import ExitRule, LoopKVCache, forward_chunk

    model = _model(*VARIANTS[variant]).eval()
    ids = _ids(model)
    with torch.no_grad():
        out = model(ids)
        seen = {}
        forward_chunk(model, ids, LoopKVCache("full"), model.cfg.loops, ExitRule("all"),
                      prefill=True, observe=lambda t, logits, gate, _: seen.update({t: (logits, gate)}))
    assert sorted(seen) == list(range(model.cfg.loops))
    for t, (logits, gate) in seen.items():
        torch.testing.assert_close(logits, out.logits[t].transpose(0, 1), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gate, out.gate_logits[t].t(), rtol=1e-5, atol=1e-5)


def test_only_the_model_sequences_the_end_of_a_loop_step():
    """The final norm and the readout are called in pretrain/model/looped.py alone: a driver
    (training, the pipeline, decoding, evaluation) that re-sequenced norm / readout / handover
    itself would show up here. (hf_files/ is the exported model, standalone by design.)"""
    import re

    pattern = re.compile(r"\.(norm\((?!dim)|_?readout\()")  # tensor.norm(dim=...) is torch's
    found = []
    for package in ("core", "parallelism", "pretrain", "data_pipeline", "slurm", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == "pretrain/model/looped.py" or rel.startswith("pretrain/formats/hf_files/"):
                continue
            found += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
                      if pattern.search(line)]
    assert found == []


@pytest.mark.parametrize("head_dim, theta", [(96, 10000.0), (128, 1000000.0), (64, 50000.0)])
def test_rope_tables_are_the_releases_fp32_tables(head_dim, theta):
    """Ouro's (Qwen2's rotary), nanochat's and Huginn's tables are computed in fp32: 1/θ^(2i/D)
    in fp32, times the fp32 position, cos and sin. Ours equal them to the bit at 4,096
    positions; an fp64 table (ours before) differs there by more than 1e-4."""
    from pretrain.model.layers import rope_tables

    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angle = torch.arange(4096, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = rope_tables(head_dim, 4096, theta)
    assert torch.equal(cos, angle.cos()) and torch.equal(sin, angle.sin())
    wide = torch.arange(4096, dtype=torch.float64)[:, None] * (
        theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))[None, :]
    assert (wide.cos().float() - cos).abs().max() > 1e-4


@pytest.mark.parametrize("style", ["ouro", "huginn", "plain"])
def test_residual_scale_scales_each_block_branch(style):
    """model.residual_scale lambda (arXiv 2606.18524): each residual branch of the shared block
    adds epsilon f(x), epsilon = lambda / (R sqrt(L)) -- written out here per sandwich style --
    and the prelude and coda stay unscaled."""
    extra = {"ouro": [], "huginn": ["model.sandwich_style=huginn"],
             "plain": ["model.sandwich_norm=false"]}[style]
    cfg = tiny_config(*extra, "model.residual_scale=2.0", "model.loops=3", "model.num_layers=4",
                      "model.prelude_layers=1")
    model = LoopedLM(cfg.model)
    eps = 2.0 / (3 * 2.0)
    assert [layer.branch_scale for layer in model.block] == [eps] * 4
    assert model.prelude[0].branch_scale == 1.0
    layer = model.block[1]
    x = torch.randn(5, 2, cfg.model.hidden_size, generator=torch.Generator().manual_seed(0))
    cos, sin = model.rope_cos[:5], model.rope_sin[:5]
    with torch.no_grad():
        a = layer.attn(layer.attn_norm(x), cos, sin)[0]
        if style == "ouro":
            y = x + eps * layer.attn_post_norm(a)
            want = y + eps * layer.mlp_post_norm(layer.mlp(layer.mlp_norm(y)))
        elif style == "huginn":
            y = layer.attn_post_norm(x + eps * a)
            want = layer.mlp_post_norm(y + eps * layer.mlp(layer.mlp_norm(y)))
        else:
            y = x + eps * a
            want = y + eps * layer.mlp(layer.mlp_norm(y))
        assert torch.equal(layer(x, cos, sin)[0], want)


def test_the_raw_handover_ablation_is_ouros_alone():
    """model.norm_between_loops: false is Ouro's ablation; every other family defines its own
    handover and refuses it in one line naming the field (huginn included)."""
    from pretrain.config import ConfigError
    from pretrain.model.families import family_names

    assert tiny_config("model.norm_between_loops=false").model.loop_mode == "ouro"
    for name in set(family_names()) - {"ouro"}:
        with pytest.raises(ConfigError, match=f"^model.norm_between_loops: false applies to "
                                              f"loop_mode ouro only \\(the {name} family"):
            tiny_config(f"model.loop_mode={name}", "model.norm_between_loops=false")
