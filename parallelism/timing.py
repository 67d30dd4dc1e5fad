"""Time of device work: CUDA events on a CUDA device, the host clock elsewhere.

On a GPU, kernels and NCCL operations are asynchronous: a host timer around them measures
launch time, and `work.wait()` of an NCCL operation only makes the compute stream wait. CUDA
events recorded on the current stream time the work itself; they are read (one synchronize)
only when a figure is asked for, never in the hot path.
"""

from __future__ import annotations

import time

import torch


class _HostMark:
    def __init__(self) -> None:
        self.t = time.perf_counter()


class _CudaMark:
    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()


def _seconds(a, b) -> float:
    if isinstance(a, _HostMark):
        return b.t - a.t
    b.event.synchronize()
    return a.event.elapsed_time(b.event) / 1e3


class DeviceClock:
    """Busy intervals (`start` .. `stop`) within a wall interval (creation .. `end`)."""

    def __init__(self, device: torch.device) -> None:
        self._mark = _CudaMark if device.type == "cuda" else _HostMark
        self._begin = self._mark()
        self._end = None
        self._intervals: list[tuple] = []
        self._open = None

    def start(self) -> None:
        self._open = self._mark()

    def stop(self) -> None:
        self._intervals.append((self._open, self._mark()))

    def end(self) -> None:
        self._end = self._mark()

    def busy_s(self) -> float:
        return sum(_seconds(a, b) for a, b in self._intervals)

    def wall_s(self) -> float:
        return 0.0 if self._end is None else _seconds(self._begin, self._end)
