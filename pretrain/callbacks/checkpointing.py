"""Checkpoints every `train.checkpoint_every` steps and at the end, and the preemption exit:
when any rank got SIGTERM/SIGUSR1, all ranks seal a checkpoint of the same step and stop."""

from __future__ import annotations

from pretrain.callbacks import Callback
from pretrain.preemption import Preempted, PreemptionSignal


class Checkpointing(Callback):
    name = "checkpointing"

    def __init__(self):
        self.preemption = PreemptionSignal()

    def on_fit_start(self, trainer) -> None:
        self.preemption.install()

    def on_step_end(self, trainer) -> None:
        t = trainer.cfg.train
        if self.preemption.agreed(trainer.device):
            trainer.save_checkpoint()
            where = trainer.wait_for_checkpoint()
            raise Preempted(f"preempted (signal {self.preemption.received or 'on a peer'}): "
                            f"checkpoint {where} at step {trainer.step}")
        if t.checkpoint_every and trainer.step % t.checkpoint_every == 0 \
                and trainer.step < t.max_steps:
            trainer.save_checkpoint()

    def on_fit_end(self, trainer) -> None:
        self.preemption.uninstall()
        if trainer.step == trainer.cfg.train.max_steps and trainer.saved_step != trainer.step:
            trainer.save_checkpoint()
