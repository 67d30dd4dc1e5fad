"""Checkpoints every `train.checkpoint_every` steps, every `train.checkpoint_minutes` minutes
and at the end, and the preemption exit: when any rank got SIGTERM/SIGUSR1/SIGINT, all ranks
seal a checkpoint of the same step and stop.

The signal handlers must be live for the whole job, from setup (building a 1.4B model and
resuming take minutes) until the final save has been waited on: a signal outside that window
would kill the job (143/138: not requeued). `pretrain train` installs them before it builds the
trainer and passes them in (`preemption`); without that, they live from the start of `fit`
until its final save is sealed.
"""

from __future__ import annotations

import signal
import time

from pretrain.callbacks import Callback
from pretrain.run.preemption import Preempted, PreemptionSignal


class Checkpointing(Callback):
    name = "checkpointing"

    def __init__(self, preemption: PreemptionSignal | None = None):
        self.owned = preemption is None  # installed and removed here, around fit
        self.preemption = preemption or PreemptionSignal()
        self.last_save = time.monotonic()

    def on_fit_start(self, trainer) -> None:
        if self.owned:
            self.preemption.install()
        self.last_save = time.monotonic()
        self._stop_if_preempted(trainer, False)  # a signal during setup or resume

    def on_step_end(self, trainer) -> None:
        t = trainer.cfg.train
        minutes = t.checkpoint_minutes
        timed = self._stop_if_preempted(
            trainer, minutes > 0 and time.monotonic() - self.last_save >= 60 * minutes)
        every = t.checkpoint_every and trainer.step % t.checkpoint_every == 0
        if (every or timed) and trainer.step < t.max_steps:
            trainer.save_checkpoint()

    def on_checkpoint(self, trainer, step: int) -> None:
        self.last_save = time.monotonic()

    def _stop_if_preempted(self, trainer, due: bool) -> bool:
        """Save and raise Preempted once any rank got a signal; else whether any rank's timed
        checkpoint is due."""
        stop, due = self.preemption.agreed(trainer.device, due=due)
        if stop:
            if trainer.saved_step != trainer.step:
                trainer.save_checkpoint()
            where = trainer.wait_for_checkpoint()
            received = self.preemption.received
            if received == signal.SIGINT:
                raise Preempted(f"interrupted (Ctrl-C) at step {trainer.step}: checkpoint "
                                f"{where} sealed", interrupted=True)
            raise Preempted(f"preempted (signal {received or 'on a peer'}): "
                            f"checkpoint {where} at step {trainer.step}")
        return due

    def on_fit_end(self, trainer) -> None:
        if trainer.step == trainer.cfg.train.max_steps and trainer.saved_step != trainer.step:
            trainer.save_checkpoint()
        if self.owned:
            trainer.wait_for_checkpoint()
            self.preemption.uninstall()
