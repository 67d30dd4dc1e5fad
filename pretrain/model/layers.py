"""Transformer building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU, one decoder layer.

The layers know nothing of loops or process groups. Attention takes the few extra inputs a
looped model needs (cached keys, loop-1 keys for attention injection, frozen keys of tokens that
already exited) as optional arguments, and returns its full keys/values so the caller decides
what to keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import ModelConfig

KV = tuple[Tensor, Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_pos: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [max_pos, head_dim // 2] for rotary embeddings (rotate-half layout)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, S, D] by per-position tables cos/sin [S, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, None], sin[None, None]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query attention over `scaled_dot_product_attention`.

    Activations are sequence-first, [S, B, H] (Megatron's layout, which sequence parallelism
    shards along S). Q, K and V come from one fused projection, so tensor parallelism needs
    one collective for all three; `n_heads`/`n_kv` are the heads held by this module (all of
    them, or one tensor-parallel rank's share)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.kv_channels
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv) * self.hd,
                                  bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: KV | None = None,
        inject: KV | None = None,
        frozen: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [n, B, H] at positions len(past)..len(past)+n-1.

        past:   keys/values of earlier positions (a KV cache), prepended.
        inject: keys/values of every position so far from the same layer on loop 1; queries
                attend to them as well, causally (attention injection).
        frozen: (mask [B, n], k, v): tokens that already exited keep these keys/values.
        Returns (output [n, B, H], keys, values) with keys/values [B, heads, past + n, D].
        """
        qkv = self.qkv_proj(x)
        n, b = qkv.shape[:2]
        q, k, v = qkv.split([self.n_heads * self.hd, self.n_kv * self.hd, self.n_kv * self.hd], -1)
        q = q.view(n, b, self.n_heads, self.hd).permute(1, 2, 0, 3)
        k = k.view(n, b, self.n_kv, self.hd).permute(1, 2, 0, 3)
        v = v.view(n, b, self.n_kv, self.hd).permute(1, 2, 0, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if frozen is not None:
            mask, fk, fv = frozen
            keep = mask[:, None, :, None]
            k, v = torch.where(keep, fk, k), torch.where(keep, fv, v)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        keys, values = k, v
        seen = k.shape[2]
        if past is None and inject is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            q_pos = torch.arange(seen - n, seen, device=x.device)
            k_pos = torch.arange(seen, device=x.device)
            if inject is not None:
                k, v = torch.cat((inject[0], k), dim=2), torch.cat((inject[1], v), dim=2)
                k_pos = torch.cat((torch.arange(inject[0].shape[2], device=x.device), k_pos))
            allowed = k_pos[None, :] <= q_pos[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
        out = out.permute(2, 0, 1, 3).reshape(n, b, self.n_heads * self.hd)
        return self.o_proj(out), keys, values


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one projection ([gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; with `sandwich_norm` (Ouro) each sublayer output is normed too."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)
        self.attn_post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.sandwich_norm else None
        self.mlp_post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if cfg.sandwich_norm else None
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, **kv) -> tuple[Tensor, Tensor, Tensor]:
        a, k, v = self.attn(self.attn_norm(x), cos, sin, **kv)
        if self.attn_post_norm is not None:
            a = self.attn_post_norm(a)
        x = x + self.drop(a)
        m = self.mlp(self.mlp_norm(x))
        if self.mlp_post_norm is not None:
            m = self.mlp_post_norm(m)
        return x + self.drop(m), k, v
