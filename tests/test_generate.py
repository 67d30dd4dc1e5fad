from __future__ import annotations

import pytest
import torch

from pretrain.model.generate import (
    KV_POLICIES,
    ExitRule,
    LoopKVCache,
    forward_chunk,
    generate,
    score,
)
from pretrain.model.looped import LoopedLM
from pretrain.text import TextCodec
from pretrain.train import Trainer
from tests.conftest import VARIANTS, tiny_config


def _model(*overrides):
    cfg = tiny_config(*overrides)
    torch.manual_seed(cfg.train.seed)
    return LoopedLM(cfg.model).eval()


def _prompt(b=2, n=7):
    return torch.randint(0, 256, (b, n), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny model after a short real training run (its gate has learned something)."""
    cfg = tiny_config("train.max_steps=80", "train.log_every=80",
                      out_dir=tmp_path_factory.mktemp("gen"))
    trainer = Trainer(cfg, log=lambda _: None, tensorboard=False)
    trainer.fit(save=False)
    return trainer.model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("loops", [1, 3])
def test_kv_cache_equals_full_recompute(variant, loops):
    """Greedy generation through the per-loop KV cache picks the same tokens, from the same
    logits, as running the training forward on the whole sequence for every new token."""
    model = _model(f"model.loops={loops}", *VARIANTS[variant])
    gen = assert_greedy_equals_recompute(model, _prompt(), 12)
    assert gen.mean_loops == loops and gen.loops_used.shape == (2, 11)


def assert_greedy_equals_recompute(model, prompt, new: int):
    """Greedy decoding of `new` tokens through the KV cache against the training forward over
    the whole sequence for every token: the same logits and tokens. Returns the generation."""
    gen = generate(model, prompt, max_new_tokens=new)
    tokens = prompt
    with torch.no_grad():
        for i in range(new):
            last = model(tokens).logits[-1][-1]
            # the KV cache's attention sums in another order than the full forward: fp32
            # rounding (~1e-6 relative) through R loops of layers
            torch.testing.assert_close(gen.logits[:, i], last, rtol=1e-5, atol=1e-5)
            tokens = torch.cat((tokens, last.argmax(-1, keepdim=True)), 1)
    assert torch.equal(gen.tokens, tokens)
    return gen


def _spread_gate(model):
    """Make the untrained gate spread exits over several steps and tokens."""
    with torch.no_grad():
        model.gate.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(4))
        model.gate.bias.fill_(-0.4)
    return model


GATE = ExitRule("gate", 0.55)


@pytest.mark.parametrize("policy", ["full", "last", "average"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_early_exit_cache_equals_recompute(variant, policy):
    """With a threshold below 1 tokens exit at different steps; the incremental cache (frozen
    keys for exited tokens, or the collapsed cache) equals re-scoring the whole sequence from
    scratch with the same rule and policy for every new token."""
    model = _spread_gate(_model(*VARIANTS[variant]))
    prompt = _prompt()
    sample = {"temperature": 1.0}  # sampled text: greedy tiny models repeat one token
    cached = generate(model, prompt, 10, rule=GATE, kv_cache=policy, **sample,
                      generator=torch.Generator().manual_seed(6))
    full = generate(model, prompt, 10, rule=GATE, kv_cache=policy, use_cache=False, **sample,
                    generator=torch.Generator().manual_seed(6))
    assert 1 < cached.mean_loops < model.cfg.loops
    assert len(set(cached.loops_used.flatten().tolist())) > 1
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.loops_used, full.loops_used)
    # the same function through the KV cache: cached keys and SDPA's causal mask against an
    # explicit one sum in another order -- fp32 rounding (~1e-6) through R loops of layers
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_threshold_one_uses_all_loops_and_low_threshold_fewer(trained):
    prompt = _prompt(1, 16)
    full = generate(trained, prompt, 16, rule=ExitRule("gate", 1.0))
    assert full.mean_loops == trained.cfg.loops
    early = generate(trained, prompt, 16, rule=ExitRule("gate", 0.3))
    assert early.mean_loops < trained.cfg.loops - 0.5
    assert early.loops_used.min() == 1


def test_test_time_loops_can_exceed_training(trained):
    gen = generate(trained, _prompt(1, 5), 4, loops=5)
    assert gen.mean_loops == 5
    with torch.no_grad():
        want = trained(gen.tokens[:, :5], loops=5).logits[-1][-1]
    # the same function through the KV cache: cached keys and SDPA's causal mask against an
    # explicit one sum in another order -- fp32 rounding (~1e-6) through R loops of layers
    torch.testing.assert_close(gen.logits[:, 0], want, rtol=1e-5, atol=1e-5)


def test_top_p_sampling_is_seeded_and_tiny_p_is_greedy(trained):
    prompt = _prompt(1, 8)
    a = generate(trained, prompt, 10, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(5))
    b = generate(trained, prompt, 10, temperature=1.0, top_p=0.9,
                 generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.tokens, b.tokens)
    greedy = generate(trained, prompt, 10)
    tiny_p = generate(trained, prompt, 10, temperature=1.0, top_p=1e-6,
                      generator=torch.Generator().manual_seed(5))
    assert torch.equal(greedy.tokens, tiny_p.tokens)


def test_stop_ends_decoding_at_the_first_stop_string_or_eos():
    """The stopped run is the unstopped run's prefix (tokens and exit steps), ending with the
    first new token after which the new text holds the stop string -- or that is EOS."""
    model, prompt, rule = _model("model.loops=4"), _prompt(1, 16), ExitRule("gate", 0.6)
    full = generate(model, prompt, 24, rule=rule)
    new = full.tokens[0, 16:].tolist()
    byte = TextCodec.of("")
    text = byte.decode(new[15:17])
    eos = TextCodec(byte.encode, byte.decode, new[11], byte.byte_lengths)
    ends = (next(k for k in range(1, 25) if text in byte.decode(new[:k])), new.index(new[11]) + 1)
    assert min(ends) > 2  # the model's output varies: neither stop comes at once
    for codec, until, n in ((byte, [text], ends[0]), (eos, [], ends[1])):
        got = generate(model, prompt, 24, rule=rule, stop=codec.stop_when(until))
        assert torch.equal(got.tokens, full.tokens[:, :16 + n]), until
        assert torch.equal(got.loops_used, full.loops_used[:, :n - 1])
        assert got.mean_loops == full.loops_used[:, :n - 1].float().mean().item()


@pytest.mark.parametrize("variant", ["ouro", "flt", "huginn"])
@pytest.mark.parametrize("policy", KV_POLICIES)
def test_left_padded_batch_decodes_each_prompt_as_alone(variant, policy):
    """Prompts of 9, 4 and 7 tokens in one batch, the shorter left-padded: each decodes the
    tokens, exit steps and (to rounding) logits it decodes alone; without the cache too."""
    model, rule = _model(*VARIANTS[variant], "model.loops=4"), ExitRule("gate", 0.6)
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n))
               for n in (9, 4, 7)]
    ids = torch.stack([torch.cat((torch.zeros(9 - len(x), dtype=torch.long), x)) for x in prompts])
    real = torch.stack([torch.arange(9) >= 9 - len(x) for x in prompts])
    got = generate(model, ids, 8, rule=rule, kv_cache=policy, real=real)
    for i, x in enumerate(prompts):
        alone = generate(model, x[None], 8, rule=rule, kv_cache=policy)
        assert torch.equal(got.tokens[i, 9:], alone.tokens[0, len(x):]), i
        assert torch.equal(got.loops_used[i], alone.loops_used[0]), i
        # padding adds exact-zero softmax terms, but every matmul runs at another batch shape
        # (other BLAS blocking): fp32 rounding ~1e-5 on logits of size ~10, over 8 tokens
        torch.testing.assert_close(got.logits[i], alone.logits[0], rtol=1e-4, atol=1e-4)
    again = generate(model, ids, 8, rule=rule, kv_cache=policy, real=real, use_cache=False)
    assert torch.equal(again.tokens, got.tokens)


def test_too_long_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, _prompt(1, 120), 20)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exited_tokens_keep_their_exit_step_keys_on_later_loops(variant):
    model = _spread_gate(_model(*VARIANTS[variant]))
    cache = LoopKVCache()
    with torch.no_grad():
        forward_chunk(model, _prompt(2, 6), cache, model.cfg.loops, GATE, prefill=True)
        _, steps = forward_chunk(model, _prompt(2, 9)[:, 6:], cache, model.cfg.loops, GATE)
    assert (steps < model.cfg.loops).any()
    checked = 0
    for b, j in (steps < model.cfg.loops).nonzero().tolist():
        e = int(steps[b, j]) - 1  # 0-based exit loop
        pos = 6 + j
        for seg, n_layers in (("block", model.cfg.num_layers), ("coda", model.cfg.coda_layers)):
            for i in range(n_layers):
                k_exit = cache.kv[(seg, e, i)][0][b, :, pos]
                for t in range(e + 1, model.cfg.loops):
                    assert torch.equal(cache.kv[(seg, t, i)][0][b, :, pos], k_exit)
                    checked += 1
    assert checked > 0


def test_prefill_fills_every_loop_and_last_average_keep_one_rth():
    """Prefill runs every loop for every prompt token (R x layers real caches); `last` and
    `average` then keep one cache: 1/R of the memory (no prelude/coda in this model)."""
    model = _spread_gate(_model("model.loops=4"))
    r, layers = 4, model.cfg.num_layers
    cache = LoopKVCache("full")
    with torch.no_grad():
        _, steps = forward_chunk(model, _prompt(2, 6), cache, r, GATE, prefill=True)
    assert sorted(cache.kv) == [("block", t, i) for t in range(r) for i in range(layers)]
    assert all(k.shape[2] == 6 for k, _ in cache.kv.values())
    want = model(_prompt(2, 6))  # the prefill's caches are the training forward's keys
    assert (steps < r).any()  # exits are reported, but every loop ran: the last loop's logits
    k0 = cache.kv[("block", 3, 0)][0]
    assert torch.isfinite(k0).all() and not torch.equal(k0, cache.kv[("block", 0, 0)][0])
    del want
    sizes = {}
    for policy in ("full", "last", "average"):
        gen = generate(model, _prompt(2, 6), 8, rule=GATE, kv_cache=policy)
        sizes[policy] = gen.cache_bytes_per_token
    assert sizes["last"] == sizes["average"] == sizes["full"] / r
    per_token = 2 * layers * model.cfg.num_kv_heads * model.cfg.kv_channels * 4  # fp32 k and v
    assert sizes["last"] == per_token


def test_last_policy_keeps_exit_step_keys_and_average_the_mean():
    model = _spread_gate(_model("model.loops=4"))
    r = 4
    for policy in ("last", "average"):
        full, col = LoopKVCache("full"), LoopKVCache(policy)
        with torch.no_grad():
            forward_chunk(model, _prompt(1, 5), full, r, ExitRule("all"), prefill=True)
            forward_chunk(model, _prompt(1, 5), col, r, ExitRule("all"), prefill=True)
        col.collapse(r)
        for i in range(model.cfg.num_layers):
            per_loop = torch.stack([full.kv[("block", t, i)][0] for t in range(r)])
            want = per_loop[-1] if policy == "last" else per_loop.mean(0)
            torch.testing.assert_close(col.kv[("block", i)][0], want)


@pytest.mark.parametrize("rule", ["gate:0.55", "delta:5.9", "fixed:2"])
@pytest.mark.parametrize("policy", ["full", "last", "average"])
def test_eval_scoring_and_generate_agree_on_every_exit_step(rule, policy):
    """`score` (what `pretrain eval` runs) on the generated text exits every decoded token at
    the step `generate` used, and gives the logits each token was chosen from."""
    model = _spread_gate(_model("model.loops=4"))
    prompt = _prompt(2, 6)
    gen = generate(model, prompt, 9, rule=ExitRule.parse(rule), kv_cache=policy, temperature=1.0,
                   generator=torch.Generator().manual_seed(6))
    logits, steps = score(model, gen.tokens, 6, 4, ExitRule.parse(rule), policy)
    assert torch.equal(steps[:, 6:-1], gen.loops_used)
    # the same function through the KV cache: cached keys and SDPA's causal mask against an
    # explicit one sum in another order -- fp32 rounding (~1e-6) through R loops of layers
    torch.testing.assert_close(logits[:, 5:-1], gen.logits, rtol=1e-5, atol=1e-5)
    if rule == "fixed:2":
        assert (gen.loops_used == 2).all()
    elif rule.startswith("gate") or policy == "full":  # (delta exits early on collapsed caches)
        assert len(set(gen.loops_used.flatten().tolist())) > 1


def test_delta_rule_exits_where_the_state_stops_moving():
    model = _model("model.loops=4")
    ids = _prompt(1, 5)
    with torch.no_grad():
        _, steps = score(model, ids, 0, 4, ExitRule("delta", 1e9), "full")
    assert (steps == 2).all()  # the earliest a change can be measured
    with torch.no_grad():
        _, steps = score(model, ids, 0, 4, ExitRule("delta", 0.0), "full")
    assert (steps == 4).all()


@pytest.mark.parametrize("text,message", [
    ("gate", "expected gate:Q, delta:EPS, kl:EPS, fixed:N or all"), ("speed:2", "expected gate:Q"),
    ("gate:x", "'x' is not a number"), ("fixed:1.5", "whole number"), ("delta:-1", ">= 0"),
    ("gate:2", "Q is a probability, in \\[0, 1\\]")])
def test_bad_exit_rules(text, message):
    with pytest.raises(ValueError, match=message):
        ExitRule.parse(text)
