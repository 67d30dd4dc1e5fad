"""Which kernels a run uses, and NVIDIA apex where a GPU node has it.

apex is not on PyPI (the PyPI package named `apex` is unrelated); a cluster user builds it
from source (README, "Fused kernels"). Where it imports on a CUDA device, AdamW is apex's
FusedAdam (one multi-tensor kernel for the whole update); otherwise torch's AdamW, fused on
CUDA, its default per-tensor path on CPU. megatron-core's `gradient_accumulation_fusion` is not used even
with apex: it writes weight gradients into the `main_grad` buffers of megatron's own DDP, which
this trainer does not use (its reducer reads `.grad`). Norms: the weighted RMSNorm in fp32 torch
ops, the weightless one `F.rms_norm`; attention: torch's scaled_dot_product_attention, which
picks FlashAttention-2 / cuDNN / memory-efficient kernels on CUDA and its flash kernel on CPU.
The run header prints all of it (`describe`).
"""

from __future__ import annotations

import importlib.util

import torch


def apex_fused_adam(device: torch.device):
    """apex.optimizers.FusedAdam where apex imports and the device is CUDA, else None."""
    if device.type != "cuda" or importlib.util.find_spec("apex") is None:
        return None
    try:
        from apex.optimizers import FusedAdam
    except ImportError:  # apex built without its CUDA extensions
        return None
    return FusedAdam


def adamw(groups, device: torch.device, **kw) -> torch.optim.Optimizer:
    """AdamW with the fastest kernel here (module docstring)."""
    fused = apex_fused_adam(device)
    if fused is not None:
        return fused(groups, adam_w_mode=True, **kw)
    return torch.optim.AdamW(groups, fused=device.type == "cuda" or None, **kw)


def attention_backend(device: torch.device) -> str:
    if device.type != "cuda":
        return "SDPA (CPU flash kernel)"
    b = torch.backends.cuda
    on = [n for n, ok in (("flash", b.flash_sdp_enabled()), ("cudnn", b.cudnn_sdp_enabled()),
                          ("mem-efficient", b.mem_efficient_sdp_enabled())) if ok]
    return f"SDPA ({' / '.join(on) or 'math'})"


def optimizer_kernel(optimizer) -> str:
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wraps it
    name = type(inner).__name__
    if name == "FusedAdam":
        return f"{type(inner).__module__.split('.')[0]} FusedAdam"
    if name == "MuonAdamW":
        return "torch Muon + AdamW"
    group = getattr(inner, "param_groups", [{}])[0]
    mode = "fused" if group.get("fused") else "foreach" if group.get("foreach") else "per-tensor"
    return f"torch {name} ({mode})"


def train_options(train) -> str:
    """The memory/speed options of the train section, as the run header and `plan` print them."""
    t = train
    recompute = t.recompute + (f" (last {t.recompute_keep_last_loops} loops kept)"
                               if t.recompute == "loops" else "")
    return (f"{t.precision}{' autocast' if t.precision == 'bf16' else ''}, recompute "
            f"{recompute}, loss chunks {t.loss_chunk_tokens or 'off'}, compile "
            f"{'on' if t.compile else 'off'}")


def describe(cfg, device: torch.device, optimizer, dp: int) -> str:
    """One line: kernels and the memory/speed options in force (`dp`: data-parallel ranks)."""
    p = cfg.parallel
    return (f"kernels: attention {attention_backend(device)}, optimizer "
            f"{optimizer_kernel(optimizer)}, norms fp32 RMSNorm / F.rms_norm, apex "
            f"{'yes' if apex_fused_adam(device) else 'no'} | {train_options(cfg.train)}, "
            "grad reduce "
            + ("none (one replica)" if dp == 1 else
               f"{'overlapped' if p.overlap_grad_reduce else 'after backward'} "
               f"({p.grad_bucket_mb:g} MB buckets)"))
