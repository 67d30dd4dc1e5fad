from __future__ import annotations

import pytest
import torch

from pretrain.model.generate import LoopKVCache, forward_chunk, generate
from pretrain.model.looped import LoopedLM
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
    prompt = _prompt()
    gen = generate(model, prompt, max_new_tokens=12)
    assert gen.loops_used == loops
    tokens = prompt
    with torch.no_grad():
        for i in range(12):
            last = model(tokens).logits[-1][-1]
            torch.testing.assert_close(gen.logits[:, i], last, rtol=1e-5, atol=1e-5)
            tokens = torch.cat((tokens, last.argmax(-1, keepdim=True)), 1)
    assert torch.equal(gen.tokens, tokens)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_early_exit_cache_equals_recompute(variant):
    """With a threshold below 1 tokens exit at different steps; the cached path (frozen keys
    for exited tokens) equals recomputing the whole sequence with the same exit rule."""
    model = _model(*VARIANTS[variant])
    with torch.no_grad():
        # spread exits over several steps and tokens
        model.gate.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(4))
        model.gate.bias.fill_(-0.4)
    prompt = _prompt()
    cached = generate(model, prompt, 10, exit_threshold=0.55)
    full = generate(model, prompt, 10, exit_threshold=0.55, use_cache=False)
    assert 1 < cached.loops_used < model.cfg.loops
    assert len(set(cached.exit_steps.flatten().tolist())) > 1
    assert torch.equal(cached.tokens, full.tokens)
    assert torch.equal(cached.exit_steps, full.exit_steps)
    torch.testing.assert_close(cached.logits, full.logits, rtol=1e-5, atol=1e-5)


def test_threshold_one_uses_all_loops_and_low_threshold_fewer(trained):
    prompt = _prompt(1, 16)
    full = generate(trained, prompt, 16, exit_threshold=1.0)
    assert full.loops_used == trained.cfg.loops
    early = generate(trained, prompt, 16, exit_threshold=0.3)
    assert early.loops_used < trained.cfg.loops - 0.5
    assert early.exit_steps.min() == 1


def test_test_time_loops_can_exceed_training(trained):
    gen = generate(trained, _prompt(1, 5), 4, loops=5)
    assert gen.loops_used == 5
    with torch.no_grad():
        want = trained(gen.tokens[:, :5], loops=5).logits[-1][-1]
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


def test_too_long_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, _prompt(1, 120), 20)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_exited_tokens_keep_their_exit_step_keys_on_later_loops(variant):
    model = _model(*VARIANTS[variant])
    with torch.no_grad():
        model.gate.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(4))
        model.gate.bias.fill_(-0.4)
    cache = LoopKVCache()
    with torch.no_grad():
        forward_chunk(model, _prompt(2, 6), cache, model.cfg.loops, 0.55)
        _, steps = forward_chunk(model, _prompt(2, 9)[:, 6:], cache, model.cfg.loops, 0.55)
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
