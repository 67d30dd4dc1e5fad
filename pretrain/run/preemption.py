"""Preemption and Ctrl-C: SIGTERM / SIGUSR1 (what SLURM sends before a time limit or a
preemption) ask the run to checkpoint at the next step boundary and exit with `EXIT_PREEMPTED`
(core/exit_codes.py); SIGINT (Ctrl-C) does the same and exits `EXIT_INTERRUPTED`, saying how
to continue -- a second Ctrl-C stops at once, without a checkpoint.

The handler only records the signal; at each step boundary the ranks agree (any rank that
got it stops everyone), so all of them save the same step -- whichever ranks the signal
reached. The SLURM layer requeues a job that exits with EXIT_PREEMPTED.

Once the ranks agree to stop, the handlers stay until the process ends: `srun
--kill-on-bad-exit` sends TERM to the other tasks as soon as the first one exits 75, and a TERM
caught by the default handler would turn a rank's 75 into 143 -- srun then reports 143 and the
job is not requeued (seen on the local cluster).
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(Exception):
    """Raised after the preemption checkpoint is sealed; `interrupted`: by Ctrl-C here (the
    user's stop, not the scheduler's: no requeue)."""

    def __init__(self, message: str, interrupted: bool = False):
        super().__init__(message)
        self.interrupted = interrupted


class PreemptionSignal:
    def __init__(self):
        self.received: int | None = None
        self.stopping = False  # the ranks agreed to stop for a preemption
        self._previous = {}

    def install(self) -> None:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        """Restore the previous handlers, unless the run is stopping for a preemption."""
        if self.stopping:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum

    def agreed(self, device: torch.device, group=None, due: bool = False) -> tuple[bool, bool]:
        """(stop, due) the same on every rank: stop once any rank received a signal, due once
        any rank says so (a timed checkpoint: the ranks' clocks differ); one tiny all-reduce."""
        flags = [self.received is not None, due]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            t = torch.tensor([float(f) for f in flags], device=device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            flags = [bool(v) for v in t.tolist()]
        self.stopping = flags[0]
        return flags[0], flags[1]
