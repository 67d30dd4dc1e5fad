"""Accelerator facts for MFU and the planner: dense bf16 peak, memory, bandwidths.

Peaks are the vendors' dense (no sparsity) bf16 tensor-core numbers; bandwidths are the
per-GPU figures collectives can use (NVLink: one direction; InfiniBand: one NIC per GPU).
Devices are matched by their whole product name (`lookup`); a GPU the table does not know has
no peak (MFU is reported unknown, with the reason), never a guessed one. On a CPU there is no
table entry to trust: the peak is measured (a large fp32 matmul).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16, FLOP/s
    memory_gb: float
    hbm_bw: float  # bytes/s
    intra_node_bw: float  # bytes/s per GPU, one direction (NVLink; PCIe where there is none)
    inter_node_bw: float  # bytes/s per GPU (InfiniBand / RoCE NIC)
    per_node: int = 8
    source: str = ""  # where the figures come from


_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023): dense = half the sparsity figure"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (2024)"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021)"
# product -> figures. Keys are what `pretrain plan --gpu` takes; PATTERNS below map the names
# torch.cuda.get_device_name reports onto them, whole-name matches only
GPUS = {
    "h100": Accelerator("H100 SXM", 989.4e12, 80, 3.35e12, 450e9, 50e9, source=_H100),
    "h100-pcie": Accelerator("H100 PCIe", 756.5e12, 80, 2.0e12, 300e9, 50e9, source=_H100),
    "h100-nvl": Accelerator("H100 NVL", 835.5e12, 94, 3.9e12, 300e9, 50e9, source=_H100),
    "h200": Accelerator("H200 SXM", 989.4e12, 141, 4.8e12, 450e9, 50e9, source=_H200),
    "h200-nvl": Accelerator("H200 NVL", 835.5e12, 141, 4.8e12, 450e9, 50e9, per_node=4,
                            source=_H200),
    "gh200": Accelerator("GH200 (96 GB HBM3)", 989.4e12, 96, 4.0e12, 450e9, 50e9, per_node=4,
                         source="NVIDIA GH200 Grace Hopper Superchip datasheet (2024)"),
    "gh200-144g": Accelerator("GH200 (144 GB HBM3e)", 989.4e12, 144, 4.9e12, 450e9, 50e9,
                              per_node=4,
                              source="NVIDIA GH200 Grace Hopper Superchip datasheet (2024)"),
    "h800": Accelerator("H800 SXM", 989.4e12, 80, 3.35e12, 200e9, 50e9,
                        source="NVIDIA H800 product brief: H100 SXM compute, NVLink 400 GB/s"),
    "h20": Accelerator("H20", 148e12, 96, 4.0e12, 450e9, 50e9,
                       source="NVIDIA H20 product brief (2024): 148 TFLOPS dense BF16"),
    "a100": Accelerator("A100 SXM 80GB", 312e12, 80, 2.039e12, 300e9, 25e9, source=_A100),
    "a100-40gb": Accelerator("A100 SXM 40GB", 312e12, 40, 1.555e12, 300e9, 25e9, source=_A100),
    "a100-pcie": Accelerator("A100 PCIe 80GB", 312e12, 80, 1.935e12, 32e9, 25e9, source=_A100),
    "a100-pcie-40gb": Accelerator("A100 PCIe 40GB", 312e12, 40, 1.555e12, 32e9, 25e9,
                                  source=_A100),
    "l40s": Accelerator("L40S", 362.05e12, 48, 0.864e12, 32e9, 25e9,
                        source="NVIDIA L40S datasheet (2023): 362.05 TFLOPS dense BF16, PCIe 4"),
    "b200": Accelerator("B200", 2250e12, 180, 8.0e12, 900e9, 50e9,
                        source="NVIDIA DGX B200 datasheet (2024): 72 PFLOPS FP8 sparse / 8 GPUs,"
                               " halved twice (dense, BF16)"),
}

# normalised device names (lower case, 'nvidia ' dropped, '-' and '_' as spaces, single spaces)
PATTERNS = [
    (r"h100( 80gb)?( hbm3)?( sxm5?)?", "h100"),
    (r"h100 pcie( 80gb)?", "h100-pcie"),
    (r"h100 nvl", "h100-nvl"),
    (r"h200( sxm)?( 141gb)?", "h200"),
    (r"h200 nvl", "h200-nvl"),
    (r"gh200( 480gb| 96gb)?( hbm3)?", "gh200"),
    (r"gh200 144g( hbm3e)?", "gh200-144g"),
    (r"h800( sxm)?", "h800"),
    (r"h20", "h20"),
    (r"a100 sxm4? 80gb", "a100"),
    (r"a100 sxm4? 40gb", "a100-40gb"),
    (r"a100 80gb pcie|a100 pcie 80gb", "a100-pcie"),
    (r"a100 pcie 40gb|a100 40gb pcie", "a100-pcie-40gb"),
    (r"l40s", "l40s"),
    (r"b200", "b200"),
]


def lookup(name: str) -> Accelerator | None:
    """The table's entry for a device name as torch reports it, or None: a product is matched
    whole (an H100 PCIe is not an H100 SXM; a GH200 is not an H200)."""
    key = " ".join(re.sub(r"[-_]", " ", name.lower()).replace("nvidia", " ").split())
    return next((GPUS[k] for pattern, k in PATTERNS if re.fullmatch(pattern, key)), None)


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


def peak_flops(device: torch.device, configured: float = 0.0) -> tuple[float | None, str]:
    """Per-process peak FLOP/s and where it comes from: the configured value, the GPU table, or
    a CPU measurement; (None, why) for a GPU the table does not know."""
    if configured:
        return configured, "train.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        gpu = lookup(name)
        if gpu is None:
            return None, (f"MFU unknown: {name!r} is not in pretrain/planning/hardware.py's table; set "
                          f"train.peak_flops to its dense bf16 FLOP/s")
        return gpu.peak_flops, f"{gpu.name} dense bf16 ({gpu.source})"
    return measured_cpu_peak(), "fp32 matmul measured on this CPU"


def memory_gb(device: torch.device) -> dict[str, float]:
    """This process's memory, GiB: the allocator's peak allocated and reserved bytes and the
    device's free memory on CUDA; the resident peak on a CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return {"peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
                "free_memory_gb": free / 2**30}
    import resource

    return {"peak_memory_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30}
