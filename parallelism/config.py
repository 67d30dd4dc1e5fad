"""The parallel section of the config and the layout checks that need no process group, so a
bad layout fails before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.config_schema import require
from parallelism.zero import validate_zero


@dataclass
class ParallelConfig:
    tensor: int = 1  # TP: megatron-core tensor parallelism
    pipeline: int = 1  # PP: the circular pipeline over the looped block
    data: int = 1  # DP
    sequence_parallel: bool = False  # shard norms/residuals along the sequence within TP
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"  # interleaved 1F1B over the R laps
    pipeline_split: list[int] = field(default_factory=list)  # block layers per stage; []: auto
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, else gloo
    timeout_minutes: float = 10.0  # process-group timeout
    peer_timeout_s: float = 15.0  # a rank without heartbeat this long is declared dead
    zero_stage: int = 0  # 0: plain data parallelism; 1, 2: DeepSpeed ZeRO over the DP group
    # reduce gradients over DP in buckets while backward runs (Megatron's --overlap-grad-reduce;
    # under ZeRO DeepSpeed's overlap_comm); grad_bucket_mb: bucket size (also DeepSpeed's)
    overlap_grad_reduce: bool = True
    grad_bucket_mb: float = 25.0

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data


def validate_layout(p: ParallelConfig, model, seq_len: int, grad_accum_steps: int,
                    depth_varies: bool = False) -> None:
    """`model`: the model section (hidden_size, num_heads, num_layers, loops, ...);
    `depth_varies`: whether a step's R may differ from model.loops (drawn or grown)."""
    m = model
    for name in ("tensor", "pipeline", "data"):
        require(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    require(p.timeout_minutes > 0, "parallel.timeout_minutes", "must be > 0")
    require(p.peer_timeout_s > 0, "parallel.peer_timeout_s", "must be > 0")
    validate_zero(p)
    require(p.grad_bucket_mb > 0, "parallel.grad_bucket_mb", f"must be > 0, got {p.grad_bucket_mb}")
    tp = p.tensor
    if tp > 1:
        for name in ("hidden_size", "num_heads", "ffn_hidden_size", "vocab_size"):
            value = getattr(m, name)
            require(value % tp == 0, f"model.{name}",
                    f"{value} is not divisible by parallel.tensor {tp}")
        require(m.num_kv_heads % tp == 0, "model.num_kv_heads",
                f"{m.num_kv_heads} KV heads cannot be split over parallel.tensor {tp} "
                "(needs num_kv_heads % tensor == 0)")
        require(m.dropout == 0 or _cuda_available(), "model.dropout",
                "dropout > 0 with parallel.tensor > 1 needs CUDA (megatron's RNG tracker)")
    if p.sequence_parallel:
        require(tp > 1, "parallel.sequence_parallel", "needs parallel.tensor > 1")
        require(seq_len % tp == 0, "train.seq_len",
                f"{seq_len} is not divisible by parallel.tensor {tp} (sequence parallelism)")
    if p.pipeline == 1:
        require(not p.pipeline_split, "parallel.pipeline_split", "needs parallel.pipeline > 1")
        return
    require(m.num_layers >= p.pipeline, "parallel.pipeline",
            f"{p.pipeline} stages need at least as many shared layers, got {m.num_layers}")
    if p.pipeline_split:
        require(len(p.pipeline_split) == p.pipeline and min(p.pipeline_split) >= 1
                and sum(p.pipeline_split) == m.num_layers, "parallel.pipeline_split",
                f"{p.pipeline_split} must be {p.pipeline} positive layer counts summing to "
                f"model.num_layers {m.num_layers}")
    if p.pipeline_schedule == "1f1b" and (m.loops > 1 or depth_varies):
        require(grad_accum_steps % p.pipeline == 0, "train.grad_accum_steps",
                f"{grad_accum_steps} microbatches do not fit the interleaved 1F1B schedule over "
                f"{m.loops} laps: need a multiple of parallel.pipeline {p.pipeline} "
                "(or parallel.pipeline_schedule=gpipe)")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
