"""How each weight is laid out: the fused blocks of a projection and how a weight is cut over
tensor-parallel ranks. One table for tensor parallelism, the layout-free checkpoint and the
Hugging Face export (which splits fused blocks into the release's separate projections).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    """How a full weight is cut over TP ranks: along `dim`, each fused block in `parts` split
    evenly, a rank's pieces concatenated. Stored on each sharded parameter as `tp_split`."""

    dim: int
    parts: tuple[int, ...]

    def shard(self, full: Tensor, rank: int, size: int) -> Tensor:
        blocks = full.split(list(self.parts), dim=self.dim)
        return torch.cat([b.chunk(size, dim=self.dim)[rank] for b in blocks], dim=self.dim)

    def unshard(self, shards: list[Tensor]) -> Tensor:
        local = [p // len(shards) for p in self.parts]
        pieces = [s.split(local, dim=self.dim) for s in shards]
        return torch.cat([torch.cat([p[i] for p in pieces], dim=self.dim)
                          for i in range(len(self.parts))], dim=self.dim)


# the named blocks of fused weights (layout-free checkpoint keys, HF export names)
FUSED_BLOCKS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up"), "qk_bias": ("q", "k")}


def fused_blocks(name: str) -> tuple[str, ...]:
    """The named blocks of weight `name` ('...qkv_proj.weight', '...attn.qk_bias'), or ('',)."""
    parts = name.split(".")
    return FUSED_BLOCKS.get(parts[-2] if parts[-1] == "weight" else parts[-1], ("",))


def split_for(cfg, name: str) -> Split | None:
    """How the weight `name` (single-process naming) is cut over TP ranks; None: replicated.
    One table for parallelize_tensor and the layout-free checkpoint."""
    f, d = cfg.ffn_hidden_size, cfg.kv_channels
    q, kv = cfg.num_heads * d, cfg.num_kv_heads * d
    if name in ("embed.weight", "lm_head.weight"):
        return Split(0, (cfg.vocab_size,))
    return {"attn.qkv_proj.weight": Split(0, (q, kv, kv)), "attn.qk_bias": Split(0, (q, kv)),
            "attn.o_proj.weight": Split(1, (q,)),
            "mlp.gate_up_proj.weight": Split(0, (f, f)), "mlp.up_proj.weight": Split(0, (f,)),
            "mlp.down_proj.weight": Split(1, (f,)),
            # a value embedding: each rank its KV heads' columns of the table and gate rows
            "attn.value_embed.table.weight": Split(1, (kv,)),
            "attn.value_embed.gate.weight": Split(0, (cfg.num_kv_heads,))}.get(name.split(".", 2)[-1])
