"""Validation during training: every `train.eval_every` steps (and at the end), the model is
scored on `train.eval_tokens` tokens of `data.validation` under the run's own layout.

Logged under val/: `loss` (the training objective) and what `pretrain eval --data` reports,
computed by the same scorer (pretrain/evaluate.py `heldout_sums` / `heldout_metrics`):
`ce_step{t}` and `bpb_step{t}` per loop step (t from 1), `bpb` (the last step's), and for each
of `train.eval_exits` `ce_exit_{rule}`, `bpb_exit_{rule}`, `loops_exit_{rule}` (every loop
runs; the rule picks the step whose prediction is scored). Each rank sums over its share
(data_pipeline/validation.py: the same tokens under any layout), and one collective adds the
shares.
"""

from __future__ import annotations

import reprlib

from parallelism.stats import Metrics
from pretrain.callbacks import Callback
from pretrain.checkpoint import CheckpointError
from pretrain.data import heldout_data
from pretrain.evaluate import heldout_metrics, scored_sums, sum_shapes
from pretrain.model.generate import ExitRule
from pretrain.text import TextCodec

GROUPS = ("exit",)  # readout exits only: decoding needs the whole model on one process


class Validation(Callback):
    name = "validation"

    def __init__(self, every: int):
        self.every = every
        self.best = float("inf")
        self.heldout = None  # (validation samples, text codec), opened by the first pass

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.every == 0 or trainer.step == trainer.cfg.train.max_steps:
            metrics = self.evaluate(trainer)
            self.best = min(self.best, metrics["val/loss"])
            trainer.emit(metrics, kind="validation")

    def evaluate(self, trainer) -> dict[str, float]:
        """One validation pass under the trainer's layout; the val/ metrics on every rank."""
        cfg, topo = trainer.cfg, trainer.topo
        rules = tuple(ExitRule.parse(r) for r in cfg.train.eval_exits)
        if self.heldout is None:
            self.heldout = heldout_data(cfg), TextCodec.of(cfg.data.tokenizer)
        heldout, codec = self.heldout
        batches = heldout.rank_batches(cfg.train.eval_tokens, cfg.train.micro_batch_size,
                                       topo.dp_rank, topo.dp)
        results = trainer.evaluate([tuple(x.to(trainer.device) for x in b) for b in batches],
                                   scored_sums(trainer.objective, trainer.cross_entropy, rules, codec))
        mine = None if results is None else {k: sum(r[k] for r in results) for k in results[0]}
        sums = Metrics()  # held by the last stage; summed over the data-parallel replicas
        for name, shape in {**sum_shapes(cfg.model.loops, len(rules), GROUPS), "loss": ()}.items():
            sums.record(name, None if mine is None else mine[name], "sum", shape)
        total = sums.reduce(topo)
        scored = heldout_metrics({k: v for k, v in total.items() if k != "loss"}, rules)
        metrics = {"val/loss": (total["loss"] / total["tokens"].clamp_min(1)).item(),
                   "val/bpb": scored[f"bpb_step{cfg.model.loops}"]}
        return metrics | {f"val/{k}": v for k, v in scored.items()}

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best", float("inf"))
        if not isinstance(best, (int, float)) or isinstance(best, bool):
            raise CheckpointError(f"meta.json: trainer.callbacks.validation: best is "
                                  f"{reprlib.repr(best)}, not a number")
        self.best = best
