"""Callbacks: every output of a run goes through these doors, so the trainer stays a straight
line (OLMo-core's Callbacks). A callback overrides what it needs:

  on_fit_start(trainer)               before the first step
  on_step_end(trainer)                after every optimizer step (trainer.step is its count)
  on_log(trainer, step, metrics)      every metric dict, a `Logged`: its `kind` says whose
                                      (train, validation, downstream); names from the one
                                      registry (parallelism/stats.py) -- "train/", "loop/",
                                      "grad_norm/", "data/", "pipeline/", "val/", "downstream/"
  on_eval(trainer, step, metrics)     after a validation pass, with its "val/" metrics
  on_checkpoint(trainer, step)        after a checkpoint of `step` was started
  on_fit_end(trainer)                 after the last step (also when the run stops early)
  state_dict() / load_state_dict(s)   saved in the checkpoint's record under the callback's
                                      name (Trainer.state_dict)

What a callback may use of the trainer: `cfg`, `topo`, `device`, `step`, `out_dir`,
`saved_step`; `emit(metrics)`; `save_checkpoint()`, `wait_for_checkpoint()`,
`checkpoint_dir(step)`; `evaluate(batches, readout)`, `objective(out, labels, ce)`,
`cross_entropy` (a forward pass under the run's layout). Nothing of its engine.

A new logger is one file with a `Callback` subclass and one line in `default_callbacks`.
"""

from __future__ import annotations


class Logged(dict):
    """Metrics by name (a dict, as every logger writes them) and the `kind` that emitted them."""

    def __init__(self, metrics: dict[str, float], kind: str):
        super().__init__(metrics)
        self.kind = kind


class Callback:
    name = "callback"

    def on_fit_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer) -> None:
        pass

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval(self, trainer, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, trainer, step: int) -> None:
        pass

    def on_fit_end(self, trainer) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def default_callbacks(cfg, log, tensorboard: bool, preemption=None) -> list[Callback]:
    """The outputs a run writes: console (`log`; None: silent), metrics.jsonl, TensorBoard,
    Weights & Biases (train.wandb_project), validation (train.eval_every), checkpoints (and the
    preemption exit, on `preemption`'s handlers when given: callbacks/checkpointing.py),
    downstream tasks (train.downstream.every)."""
    from pretrain.callbacks.checkpointing import Checkpointing
    from pretrain.callbacks.console import Console
    from pretrain.callbacks.jsonl import MetricsFile
    from pretrain.callbacks.validation import Validation

    out: list[Callback] = [MetricsFile()]
    if log is not None:
        out.append(Console(log))
    if tensorboard:
        from pretrain.callbacks.tensorboard import TensorBoard

        out.append(TensorBoard())
    if cfg.train.wandb_project:
        from pretrain.callbacks.wandb import WandB

        out.append(WandB(cfg.train.wandb_project))
    if cfg.train.eval_every:
        out.append(Validation(cfg.train.eval_every))
    out.append(Checkpointing(preemption))
    if cfg.train.downstream.every:  # after Checkpointing: it evaluates the step's checkpoint
        from pretrain.callbacks.downstream import Downstream

        out.append(Downstream(cfg))
    return out
