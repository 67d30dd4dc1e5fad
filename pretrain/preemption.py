"""Preemption: SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a preemption) ask
the run to checkpoint at the next step boundary and exit with `EXIT_PREEMPTED`
(core/exit_codes.py).

The handler only records the signal; at each step boundary the ranks agree (any rank that
got it stops everyone), so all of them save the same step -- whichever ranks the signal
reached. The SLURM layer requeues a job that exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised after the preemption checkpoint is sealed."""


class PreemptionSignal:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, device: torch.device, group=None) -> bool:
        """True on every rank once any rank received a signal (one tiny all-reduce)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            t = torch.tensor([float(flag)], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flag = bool(t.item())
        return flag
