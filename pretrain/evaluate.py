"""Held-out loss of a model, per loop step and per exit rule: `pretrain eval` and the sweeps'
validation loss, on the run's validation data."""

from __future__ import annotations

import dataclasses

import torch

from pretrain.config import Config
from pretrain.data import default_data, heldout_data
from pretrain.model.generate import ExitRule, score
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import IGNORE_INDEX, compute_objective, per_step_ce, token_cross_entropy
from pretrain.text import TextCodec, bits_per_byte

EVAL_SEED_OFFSET = 1_000_003  # without validation data: training data in another order


def heldout_batches(cfg: Config, batches: int) -> tuple[list, str, bool]:
    """`batches` micro-batches of held-out data on one process, what that data is, and whether
    it is validation data: the run's `data.validation` (the first samples, in order), or --
    said plainly -- training data in another sample order (seed + EVAL_SEED_OFFSET)."""
    t = cfg.train
    held = heldout_data(cfg)
    if held is not None:
        out = held.rank_batches(batches * t.micro_batch_size * t.seq_len, t.micro_batch_size, 0, 1)
        return out, f"validation data ({', '.join(held.names)})", True
    train = dataclasses.replace(t, seed=t.seed + EVAL_SEED_OFFSET, grad_accum_steps=1)
    it = default_data(dataclasses.replace(cfg, train=train)).batches()
    return [next(it) for _ in range(batches)], ("TRAINING data (no data.validation configured; "
                                                "another sample order than training)"), False


@torch.no_grad()
def evaluate(cfg: Config, model: LoopedLM, batches: int) -> dict:
    """Mean objective and CE per loop step over `batches` micro-batches of held-out data
    (`heldout_batches`; "data" says which)."""
    model.eval()
    data, which, validation = heldout_batches(cfg, batches)
    loss, ce = 0.0, torch.zeros(cfg.model.loops)
    for inputs, labels in data:
        out = compute_objective(cfg.objective, model(inputs), labels, token_cross_entropy)
        loss += out.loss.item() / batches
        ce += out.ce.detach() / batches
    return {"loss": loss, "ce_per_step": ce.tolist(), "ce_final": ce[-1].item(),
            "tokens": batches * cfg.train.micro_batch_size * cfg.train.seq_len, "data": which,
            "validation": validation}


@torch.no_grad()
def exit_table(cfg: Config, model: LoopedLM, batches: int, rules: tuple[ExitRule, ...],
               policy: str = "full", prefill: int = 0) -> dict:
    """Held-out CE and bits per byte per loop step (every loop run), and per exit rule the CE,
    bits per byte and mean loops of the tokens after the first `prefill` of each sequence,
    decoded exactly as `generate` decodes them (model/generate.py `score`: early exit, the
    `policy` KV cache). Bits per byte: pretrain/text.py (tokens that stand for no text, EOS,
    are left out of it).
    Returns {"steps": [(R, ce, bpb)], "exits": [(rule, ce, bpb, mean loops)], "tokens": n,
    "bytes": n, "data": which}."""
    model.eval()
    data, which, validation = heldout_batches(cfg, batches)
    codec = TextCodec.of(cfg.data.tokenizer)
    r = cfg.model.loops
    ce_sum = torch.zeros(r, dtype=torch.float64)
    nats = torch.zeros(r, dtype=torch.float64)  # CE of the tokens that stand for text
    exit_ce = torch.zeros(len(rules), dtype=torch.float64)
    exit_nats = torch.zeros(len(rules), dtype=torch.float64)
    exit_loops = torch.zeros(len(rules), dtype=torch.float64)
    count, n_bytes = 0, 0
    for inputs, labels in data:
        target = labels[:, prefill:]
        keep = target != IGNORE_INDEX
        target_bytes = codec.bytes_of(target)
        text = (target_bytes > 0) & keep
        steps = per_step_ce(model(inputs).logits, labels.t())[:, prefill:]  # [R, S', B]
        ce_sum += (steps * keep.t()).sum((1, 2)).double()
        nats += (steps * text.t()).sum((1, 2)).double()
        for j, rule in enumerate(rules):
            logits, used = score(model, inputs, prefill, r, rule, policy)
            ce = token_cross_entropy(logits[:, prefill:].transpose(0, 1), target.t()).t()
            exit_ce[j] += (ce * keep).sum().double()
            exit_nats[j] += (ce * text).sum().double()
            exit_loops[j] += (used[:, prefill:] * keep).sum().double()
        count += int(keep.sum())
        n_bytes += int(target_bytes[keep].sum())
    return {"steps": [(t + 1, (ce_sum[t] / count).item(), bits_per_byte(nats[t].item(), n_bytes))
                      for t in range(r)],
            "exits": [(str(rule), (exit_ce[j] / count).item(),
                       bits_per_byte(exit_nats[j].item(), n_bytes), (exit_loops[j] / count).item())
                      for j, rule in enumerate(rules)], "tokens": count, "bytes": n_bytes,
            "data": which, "validation": validation}
