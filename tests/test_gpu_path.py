"""What the GPU path does that a CPU can show: the device a rank takes, TF32 pinned off in the
CUDA tier, device-time measurement through CUDA events."""

from __future__ import annotations

import os

import pytest
import torch

from core.config_schema import ConfigError
from parallelism import timing
from parallelism.topology import pick_device
from pretrain.planning import hardware
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


@pytest.mark.parametrize("reported, product", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200", "H200 SXM"), ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200 (96 GB HBM3)"), ("NVIDIA GH200 144G HBM3e", "GH200 (144 GB HBM3e)"),
    ("NVIDIA H800", "H800 SXM"), ("NVIDIA H20", "H20"), ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"),
    ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"), ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
    ("NVIDIA A100-PCIE-40GB", "A100 PCIe 40GB"), ("NVIDIA L40S", "L40S"), ("NVIDIA B200", "B200"),
])
def test_gpu_names_match_whole_products(reported, product):
    """torch's device names map onto the product, not onto a substring's: a PCIe or NVL H100
    does not get the SXM peak, a GH200 is not an H200; every entry names its source."""
    gpu = hardware.lookup(reported)
    assert gpu is not None and gpu.name == product and gpu.source


@pytest.mark.parametrize("reported", ["NVIDIA H100X", "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB",
                                      "NVIDIA H2000", "AMD Instinct MI300X"])
def test_unknown_gpus_have_no_peak(reported):
    assert hardware.lookup(reported) is None


def test_an_unknown_gpu_reports_mfu_unknown_with_the_reason(monkeypatch):
    """Not a CPU measurement standing in for a GPU's peak (MFU far above 100%): no peak, and
    one line saying why and what to set."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA GeForce RTX 4090")
    monkeypatch.setattr(hardware, "measured_cpu_peak", lambda: pytest.fail("CPU peak for a GPU"))
    peak, why = hardware.peak_flops(torch.device("cuda", 0))
    assert peak is None and "RTX 4090" in why and "train.peak_flops" in why and "\n" not in why
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 PCIe")
    assert hardware.peak_flops(torch.device("cuda", 0))[0] == 756.5e12
    assert hardware.peak_flops(torch.device("cuda", 0), 1e15)[0] == 1e15


def test_cuda_memory_reports_allocated_reserved_and_free(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (3 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *_: 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *_: 2 * 2**30)
    assert hardware.memory_gb(torch.device("cuda", 0)) == {
        "peak_memory_gb": 1.0, "peak_reserved_gb": 2.0, "free_memory_gb": 3.0}
    assert set(hardware.memory_gb(torch.device("cpu"))) == {"peak_memory_gb"}
