"""Held-out loss of a model, per loop step: what looping buys, and the sweeps' eval loss."""

from __future__ import annotations

import dataclasses

import torch

from pretrain.config import Config
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import compute_objective, token_cross_entropy

EVAL_SEED_OFFSET = 1_000_003  # eval draws its samples in another order than training


def eval_data(cfg: Config):
    """The configured data in another sample order than training (seed + EVAL_SEED_OFFSET),
    one micro-batch per step, on one process."""
    from pretrain.train import default_data

    train = dataclasses.replace(cfg.train, seed=cfg.train.seed + EVAL_SEED_OFFSET,
                                grad_accum_steps=1)
    return default_data(dataclasses.replace(cfg, train=train))


@torch.no_grad()
def evaluate(cfg: Config, model: LoopedLM, batches: int, data=None) -> dict:
    """Mean objective and CE per loop step over `batches` micro-batches of the configured
    data (a different sample order than training: seed + EVAL_SEED_OFFSET)."""
    model.eval()
    it = (data or eval_data(cfg)).batches()
    loss, ce = 0.0, torch.zeros(cfg.model.loops)
    for _ in range(batches):
        inputs, labels = next(it)
        out = compute_objective(cfg.objective, model(inputs), labels, token_cross_entropy)
        loss += out.loss.item() / batches
        ce += out.ce.detach() / batches
    return {"loss": loss, "ce_per_step": ce.tolist(), "ce_final": ce[-1].item(),
            "tokens": batches * cfg.train.micro_batch_size * cfg.train.seq_len}


@torch.no_grad()
def exit_table(cfg: Config, model: LoopedLM, batches: int, thresholds=(0.3, 0.5, 0.7, 0.9),
               data=None) -> dict:
    """Held-out CE per loop step, and with adaptive exit: each token leaves at the first step
    whose cumulative exit probability reaches q (the last step otherwise), as in generation.
    Returns {"steps": [(R, ce)], "exits": [(q, ce, mean loops)]}."""
    from pretrain.model.objective import IGNORE_INDEX, exit_log_probs, per_step_ce

    model.eval()
    it = (data or eval_data(cfg)).batches()
    r = cfg.model.loops
    ce_sum = torch.zeros(r, dtype=torch.float64)
    exit_ce = torch.zeros(len(thresholds), dtype=torch.float64)
    exit_loops = torch.zeros(len(thresholds), dtype=torch.float64)
    count = 0
    for _ in range(batches):
        inputs, labels = next(it)
        out = model(inputs)
        target = labels.t()  # [S, B], sequence-first like the logits
        ce = per_step_ce(out.logits, target)  # [R, S, B]
        keep = target != IGNORE_INDEX
        cdf = exit_log_probs(out.gate_logits).exp().cumsum(0)  # [R, S, B]
        ce_sum += (ce * keep).sum((1, 2)).double()
        for j, q in enumerate(thresholds):
            step = torch.where(cdf >= q, torch.arange(r).view(-1, 1, 1), r - 1).amin(0)
            exit_ce[j] += (ce.gather(0, step[None])[0] * keep).sum().double()
            exit_loops[j] += ((step + 1) * keep).sum().double()
        count += int(keep.sum())
    return {"steps": [(t + 1, (ce_sum[t] / count).item()) for t in range(r)],
            "exits": [(q, (exit_ce[j] / count).item(), (exit_loops[j] / count).item())
                      for j, q in enumerate(thresholds)], "tokens": count}
