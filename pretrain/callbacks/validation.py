"""Validation during training: every `train.eval_every` steps (and at the end), the model is
scored on `train.eval_tokens` tokens of `data.validation` under the run's own layout.

Logged under val/: `loss` (the training objective), `ce_step{t}` (CE of every loop step),
`bpb` (bits per byte of the last step: pretrain/text.py, tokenizer-independent),
`ce_exit_{rule}` and `loops_exit_{rule}` for each of `train.eval_exits` (every loop runs; the
rule picks the step whose prediction is scored, model/generate.py `readout_exit_steps`).
Each rank sums CE x tokens over its share (data_pipeline/validation.py: the same tokens under
any layout), and one collective adds the shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from core.model_interface import IGNORE_INDEX
from parallelism.stats import reduce_named
from pretrain.callbacks import Callback
from pretrain.data import heldout_data
from pretrain.model.generate import ExitRule, readout_exit_steps
from pretrain.text import TextCodec, bits_per_byte


def validation_sums(objective, cross_entropy, rules: list[ExitRule], codec: TextCodec):
    """A readout (LoopedOutput, labels) -> sums over this micro-batch's tokens."""
    def readout(out, labels: Tensor) -> dict[str, Tensor]:
        ces: list[Tensor] = []

        def recording(logits, target):  # each step's per-token CE, computed once
            ces.append(cross_entropy(logits, target))
            return ces[-1]

        mask = (labels.t() != IGNORE_INDEX).double()
        n_bytes = codec.bytes_of(labels.t()).double() * mask
        tokens = mask.sum()
        loss = objective(out, labels, recording).loss.double() * tokens
        ce = torch.stack(ces).double()  # [R, S, B]
        exits = [readout_exit_steps(rule, out.gate_logits) for rule in rules]
        return {"tokens": tokens, "loss": loss, "ce": (ce * mask).sum((1, 2)),
                "bytes": n_bytes.sum(), "nats": (ce[-1] * (n_bytes > 0)).sum(),
                "ce_exit": torch.stack([(ce.gather(0, s[None]).squeeze(0) * mask).sum()
                                        for s in exits]) if rules else torch.zeros(0),
                "loops_exit": torch.stack([((s + 1) * mask).sum() for s in exits])
                if rules else torch.zeros(0)}
    return readout


def evaluate_heldout(trainer) -> dict[str, float]:
    """One validation pass under the trainer's layout; the val/ metrics on every rank."""
    cfg, topo, engine = trainer.cfg, trainer.topo, trainer.engine
    rules = [ExitRule.parse(r) for r in cfg.train.eval_exits]
    if trainer.heldout is None:  # opened once, on the first pass
        trainer.heldout = heldout_data(cfg), TextCodec.of(cfg.data.tokenizer)
    heldout, codec = trainer.heldout
    batches = heldout.rank_batches(cfg.train.eval_tokens, cfg.train.micro_batch_size,
                                           topo.dp_rank, topo.dp)
    batches = [tuple(x.to(trainer.device) for x in b) for b in batches]
    results = engine.evaluate(batches, validation_sums(engine.objective_with, engine.cross_entropy,
                                                       rules, codec))
    mine = None
    if results is not None:
        mine = {k: sum(r[k] for r in results) for k in results[0]}
    r, n = cfg.model.loops, len(rules)
    shapes = {"tokens": (), "loss": (), "ce": (r,), "bytes": (), "nats": (), "ce_exit": (n,),
              "loops_exit": (n,)}
    total = reduce_named(mine, shapes, topo, mean=False)
    tokens = total["tokens"].clamp_min(1)
    metrics = {"val/loss": (total["loss"] / tokens).item(), "val/tokens": total["tokens"].item(),
               "val/bpb": bits_per_byte(total["nats"].item(), total["bytes"].item())}
    metrics |= {f"val/ce_step{t + 1}": (total["ce"][t] / tokens).item() for t in range(r)}
    for j, rule in enumerate(rules):
        metrics[f"val/ce_exit_{rule}"] = (total["ce_exit"][j] / tokens).item()
        metrics[f"val/loops_exit_{rule}"] = (total["loops_exit"][j] / tokens).item()
    return metrics


class Validation(Callback):
    name = "validation"

    def __init__(self, every: int):
        self.every = every
        self.best = float("inf")

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.max_steps:
            metrics = evaluate_heldout(trainer)
            self.best = min(self.best, metrics["val/loss"])
            trainer.emit(metrics, validation=True)

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best", float("inf"))
