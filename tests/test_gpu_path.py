"""What the GPU path does that a CPU can show: the device a rank takes, TF32 pinned off in the
CUDA tier, device-time measurement through CUDA events."""

from __future__ import annotations

import os

import pytest
import torch

from core.config_schema import ConfigError
from parallelism import timing
from parallelism.topology import pick_device
from tests.conftest import pin_fp32


def _gpus(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


@pytest.mark.parametrize("name", ["cuda", "auto"])
def test_one_visible_gpu_is_cuda_0_whatever_the_local_rank(monkeypatch, name):
    """SLURM binds one GPU per task: each task sees cuda:0 only, whatever its local rank."""
    _gpus(monkeypatch, 1)
    assert [pick_device(name, r) for r in range(4)] == [torch.device("cuda", 0)] * 4


def test_several_visible_gpus_are_taken_by_local_rank(monkeypatch):
    _gpus(monkeypatch, 8)
    assert pick_device("cuda", 5) == torch.device("cuda", 5)
    with pytest.raises(ConfigError, match="local rank 9 has no GPU of its own"):
        pick_device("cuda", 9)
    _gpus(monkeypatch, 0)
    assert pick_device("auto", 3) == torch.device("cpu")


@pytest.mark.parametrize("env", ["1", None])
def test_fp32_stays_fp32_whatever_the_environment_says(env, monkeypatch):
    """NGC's TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 is dropped before cuBLAS starts and TF32 is off,
    so the CUDA tier's fp32 comparisons with the CPU are fp32 ones."""
    if env is not None:
        monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", env)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    pin_fp32()
    assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE" not in os.environ
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"


class _Event:
    """A CUDA event stand-in: its time is what the fake device clock says when recorded."""

    now = 0.0
    synced = 0

    def __init__(self, enable_timing=False):
        assert enable_timing

    def record(self):
        self.t = _Event.now

    def synchronize(self):
        _Event.synced += 1

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3  # milliseconds


def test_cuda_timings_come_from_events_not_the_host_clock(monkeypatch):
    """On a CUDA device busy and wall time are the events' (device) time, read only when asked
    for; the host clock, which sees kernel launches only, is not consulted."""
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: pytest.fail("host clock read"))
    _Event.now, _Event.synced = 0.0, 0
    clock = timing.DeviceClock(torch.device("cuda", 0))
    for busy, idle in ((2.0, 1.0), (3.0, 0.5)):
        _Event.now += idle
        clock.start()
        _Event.now += busy
        clock.stop()
    clock.end()
    assert _Event.synced == 0  # nothing waits on the device until a figure is read
    assert clock.busy_s() == pytest.approx(5.0) and clock.wall_s() == pytest.approx(6.5)
    assert _Event.synced > 0


def test_cpu_timings_use_the_host_clock(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", lambda **_: pytest.fail("CUDA event on CPU"))
    ticks = iter([0.0, 1.0, 3.0, 4.0])
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(ticks))
    clock = timing.DeviceClock(torch.device("cpu"))
    clock.start()
    clock.stop()
    clock.end()
    assert clock.busy_s() == 2.0 and clock.wall_s() == 4.0
