"""Hang safety: every rank beats a counter in the job's rendezvous store; a rank whose counter
stops moving is named, and no survivor waits on it for ever.

The check compares counters, not clocks (nodes' clocks may disagree): a peer is lost when its
counter has not moved for `grace` seconds of this rank's time. A survivor whose collective
fails (gloo notices a closed connection at once) asks `diagnose()` which rank it was; one
stuck inside a collective is ended by the watchdog thread itself. Either way the process exits
with EXIT_PEER_LOST within grace + a few seconds, naming the rank.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time

import torch.distributed as dist

from core.exit_codes import EXIT_PEER_LOST

KEY = "pretrain/heartbeat/{}"
STORE_LOST = "lost the rendezvous store: rank 0 or the launcher died"


class Watchdog:
    def __init__(self, rank: int, world: int, interval: float = 1.0, grace: float = 15.0):
        self.rank, self.world, self.interval, self.grace = rank, world, interval, grace
        self.store = dist.distributed_c10d._get_default_store()
        self.seen: dict[int, tuple[int, float]] = {}  # peer -> (counter, when it last moved)
        self.beats = 0
        self.lock = threading.Lock()
        self.store_lost = False
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)
        self.thread.start()
        atexit.register(self.stop)  # never left inside a store call while the process ends

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5 * self.interval)

    def _beat_and_look(self) -> list[int]:
        self.beats += 1
        self.store.set(KEY.format(self.rank), str(self.beats))
        now, lost = time.monotonic(), []
        for peer in range(self.world):
            if peer == self.rank:
                continue
            key = KEY.format(peer)
            count = int(self.store.get(key)) if self.store.check([key]) else -1
            with self.lock:
                last = self.seen.get(peer)
                if last is None or last[0] != count:
                    self.seen[peer] = (count, now)
                elif now - last[1] > self.grace:
                    lost.append(peer)
        return lost

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                lost = self._beat_and_look()
            except Exception:  # the store's host (rank 0 or the launcher) is gone
                if self.stopping.is_set():
                    return
                self.store_lost = True
                self._exit(STORE_LOST)
            if lost and not self.stopping.is_set():
                self._exit(self.describe(lost))
            self.stopping.wait(self.interval)

    def describe(self, lost: list[int]) -> str:
        names = ", ".join(str(r) for r in lost)
        return (f"rank {names} stopped responding (no heartbeat for {self.grace:.0f} s); "
                f"rank {self.rank} exits")

    def _exit(self, message: str) -> None:
        print(f"pretrain: error: {message}", file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)

    def diagnose(self, wait: float | None = None) -> str | None:
        """After a failed collective: which peer died, waiting up to `wait` s (default grace +
        2 intervals) for its heartbeat to go stale. None if every peer is alive."""
        deadline = time.monotonic() + (self.grace + 2 * self.interval if wait is None else wait)
        while time.monotonic() < deadline:
            if self.store_lost:
                return STORE_LOST
            now = time.monotonic()
            with self.lock:
                lost = [p for p, (_, t) in self.seen.items() if now - t > self.grace]
            if lost:
                return self.describe(lost)
            time.sleep(self.interval / 2)
        return None
