"""`pretrain doctor`: is this node set up for the run? One line per component -- torch, CUDA,
NCCL, cuDNN, the GPUs and the peak FLOP/s MFU is computed against, megatron-core, DeepSpeed,
apex, mpi4py, the attention and optimizer kernels a run would take, bf16, free memory, the
launcher and this process's rank -- then a verdict:

  ready     everything a run here needs is present;
  degraded  it runs, slower or smaller than it could (no GPU, no apex, a GPU missing from the
            peak table...), each reason named;
  blocked   it cannot run (a run config's needs unmet: TP/SP without megatron-core, ZeRO
            without DeepSpeed, bf16 where the device has none); exit status 1.

With a run config (`--config`) the checks are that run's needs; without one, the node's.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

EXIT_BLOCKED = 1


@dataclass
class Finding:
    what: str
    detail: str
    level: str = "ok"  # ok | degraded | blocked
    why: str = ""  # for the verdict, where level is not ok


def version(dist: str) -> str | None:
    """An installed distribution's version, or None."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


# the torch this package runs on (setup.cfg install_requires says the same; tests/test_install.py):
# 2.9 brought torch.optim.Muon, the newest API used; megatron-core 0.16 needs >= 2.6, DeepSpeed
# 0.19 >= 2.0. CI runs the whole suite on 2.13.0 and the fast tier on 2.9.1 (.ci/run)
TORCH_RANGE = ">=2.9.0a0,<2.16"


def _torch() -> list[Finding]:
    from packaging.specifiers import SpecifierSet

    v = torch.__version__
    if SpecifierSet(TORCH_RANGE).contains(v, prereleases=True):
        return [Finding("torch", f"{v} (supported: {TORCH_RANGE})")]
    return [Finding("torch", f"{v} (supported: {TORCH_RANGE})", "blocked",
                    f"torch {v} is outside the supported range {TORCH_RANGE}")]


def _cuda(device: torch.device) -> list[Finding]:
    if device.type != "cuda":
        return [Finding("CUDA", "no CUDA device: CPU only (gloo) -- tests and tiny runs",
                        "degraded", "no GPU (CPU only)")]
    from pretrain.planning.hardware import lookup

    out = [Finding("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"),
           Finding("NCCL", ".".join(map(str, torch.cuda.nccl.version()))
                   if torch.distributed.is_nccl_available() else "not available",
                   "ok" if torch.distributed.is_nccl_available() else "degraded",
                   "" if torch.distributed.is_nccl_available() else "no NCCL: gloo between GPUs"),
           Finding("cuDNN", str(torch.backends.cudnn.version()))]
    for i in range(torch.cuda.device_count()):
        name = torch.cuda.get_device_name(i)
        free, total = torch.cuda.mem_get_info(i)
        gpu = lookup(name)
        out.append(Finding(f"GPU {i}", f"{name}, sm_{''.join(map(str, torch.cuda.get_device_capability(i)))}"
                           f", {_gib(free)} free of {_gib(total)}, peak "
                           + (f"{gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 (MFU's denominator)" if gpu
                              else "unknown: set train.peak_flops for MFU"),
                           "ok" if gpu else "degraded", "" if gpu else f"{name} not in the peak table"))
    return out


def _packages(device: torch.device) -> list[Finding]:
    from pretrain.kernels import apex_fused_adam

    out = []
    for dist, use in (("megatron-core", "tensor/sequence parallel"), ("deepspeed", "ZeRO"),
                      ("mpi4py", "mpirun launch")):
        v = version(dist)
        out.append(Finding(dist, f"{v} ({use})" if v else f"not installed ({use} unavailable)"))
    apex = apex_fused_adam(device) is not None
    out.append(Finding("apex", "FusedAdam importable" if apex else
                       "not importable: torch's AdamW (fused on CUDA)" if device.type == "cuda" else
                       "not used on CPU", "degraded" if device.type == "cuda" and not apex else "ok",
                       "no apex FusedAdam" if device.type == "cuda" and not apex else ""))
    return out


def _kernels(device: torch.device) -> list[Finding]:
    from pretrain.kernels import adamw, attention_backend, optimizer_kernel
    from pretrain.planning.hardware import measured_cpu_peak

    probe = torch.nn.Parameter(torch.zeros(8, device=device))
    out = [Finding("attention", attention_backend(device)),
           Finding("optimizer", optimizer_kernel(adamw([probe], device, lr=1e-3)))]
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
    else:
        bf16 = torch.amp.autocast_mode.is_autocast_available("cpu")
        out.append(Finding("peak", f"{measured_cpu_peak() / 1e9:.0f} GFLOP/s fp32 matmul measured "
                                   "(MFU's denominator on CPU)"))
    out.append(Finding("bf16", f"autocast on {device.type}: {'yes' if bf16 else 'no'}"))
    return out


def _memory(out_dir: Path) -> Finding:
    avail = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text()
                  .splitlines() if line.startswith("MemAvailable:")), 0) \
        if Path("/proc/meminfo").is_file() else 0
    where = next((p for p in (out_dir, *out_dir.parents) if p.exists()), Path.cwd())
    return Finding("memory", f"{_gib(avail)} RAM available, {_gib(shutil.disk_usage(where).free)} "
                             f"free disk at {where}")


def _launcher(cfg) -> list[Finding]:
    from parallelism.launch import discover

    got = discover()
    detail = f"{got.source}: rank {got.rank} of {got.world}"
    if cfg is None or cfg.parallel.world_size == got.world:
        return [Finding("launcher", detail)]
    return [Finding("launcher", f"{detail}; the config's layout needs {cfg.parallel.world_size} "
                                "processes (run it under torchrun/srun/mpirun with that many)")]


def _needs(cfg, device: torch.device) -> list[Finding]:
    """What this run config requires of the node."""
    p, out = cfg.parallel, []
    if (p.tensor > 1 or p.sequence_parallel) and version("megatron-core") is None:
        out.append(Finding("config", "", "blocked", f"parallel.tensor={p.tensor} needs megatron-core "
                                                    "(not installed)"))
    if p.zero_stage and version("deepspeed") is None:
        out.append(Finding("config", "", "blocked", f"parallel.zero_stage={p.zero_stage} needs "
                                                    "DeepSpeed (not installed)"))
    if cfg.train.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        out.append(Finding("config", "", "blocked", f"train.precision=bf16: "
                                                    f"{torch.cuda.get_device_name()} has no bf16"))
    return out


def diagnose(cfg=None) -> list[Finding]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(cfg.train.out_dir) if cfg is not None else Path.cwd()
    return [Finding("environment", _placement_env()), *_torch(), *_cuda(device),
            *_packages(device), *_kernels(device), _memory(out_dir), *_launcher(cfg),
            *(_needs(cfg, device) if cfg is not None else [])]


def report(findings: list[Finding]) -> tuple[str, int]:
    """The lines and the exit status (0 ready/degraded, EXIT_BLOCKED blocked)."""
    lines = [f"{f.what:<14} {f.detail}" for f in findings if f.detail]
    blocked = [f.why for f in findings if f.level == "blocked"]
    degraded = [f.why for f in findings if f.level == "degraded"]
    if blocked:
        lines.append(f"verdict: blocked: {'; '.join(blocked)}")
    elif degraded:
        lines.append(f"verdict: degraded: {'; '.join(degraded)}")
    else:
        lines.append("verdict: ready")
    return "\n".join(lines), EXIT_BLOCKED if blocked else 0


def _placement_env() -> str:
    """The environment variables that steer placement and threads."""
    keys = ("CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "NCCL_SOCKET_IFNAME", "DS_ACCELERATOR")
    return (", ".join(f"{k}={os.environ[k]}" for k in keys if k in os.environ)
            or f"none of {', '.join(keys)} is set (defaults apply)")
