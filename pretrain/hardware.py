"""Accelerator facts for MFU and the planner: dense bf16 peak, memory, bandwidths.

Peaks are the vendors' dense (no sparsity) bf16 tensor-core numbers; bandwidths are the
per-GPU figures collectives can use (NVLink: one direction; InfiniBand: one NIC per GPU).
On a CPU there is no table entry to trust: the peak is measured (a large fp32 matmul).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16, FLOP/s
    memory_gb: float
    hbm_bw: float  # bytes/s
    intra_node_bw: float  # bytes/s per GPU, one direction (NVLink)
    inter_node_bw: float  # bytes/s per GPU (InfiniBand / RoCE NIC)
    per_node: int = 8


GPUS = {
    "h100": Accelerator("H100 SXM", 989.4e12, 80, 3.35e12, 450e9, 50e9),
    "h200": Accelerator("H200 SXM", 989.4e12, 141, 4.8e12, 450e9, 50e9),
    "a100": Accelerator("A100 SXM 80GB", 312e12, 80, 2.04e12, 300e9, 25e9),
    "b200": Accelerator("B200", 2250e12, 180, 8.0e12, 900e9, 50e9),
}


def lookup(name: str) -> Accelerator | None:
    key = name.lower()
    return next((gpu for k, gpu in GPUS.items() if k in key), None)


def measured_cpu_peak(n: int = 1024, reps: int = 5) -> float:
    """fp32 matmul FLOP/s this process reaches (best of `reps`): the CPU's practical peak."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        tick = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - tick)
    return 2 * n ** 3 / best


def peak_flops(device: torch.device, configured: float = 0.0) -> float:
    """Per-process peak FLOP/s: the configured value, the GPU table, or a CPU measurement."""
    if configured:
        return configured
    if device.type == "cuda":
        gpu = lookup(torch.cuda.get_device_name(device))
        if gpu is not None:
            return gpu.peak_flops
    return measured_cpu_peak()


def peak_memory_bytes(device: torch.device) -> int:
    """The most memory this process has held: CUDA allocator peak, or the CPU resident peak."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
