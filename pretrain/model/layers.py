"""Transformer building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU / relu^2, one
decoder layer.

The layers know nothing of loops or process groups. Attention takes the few extra inputs a
looped model needs as optional arguments -- cached keys, frozen keys of tokens that already
exited, and a separate source for its queries (the Fully Looped Transformer's "queries from the
previous loop") -- and returns its keys/values so the caller decides what to keep.

Variants of the FLT authors' recipe (FuRuF-11/FullyLoopedTransformer, nanochat/gpt.py), each a
`model.*` field: `norm_weights: false` (RMSNorm without a learned scale), `qk_norm` (weightless
RMSNorm of every query and key head after RoPE, epsilon `qk_norm_eps`), `mlp: relu2`
(down(relu(up(x))^2)); Parcae's (sandyresearch/parcae, parcae_lm/modules/): `mlp: relu2_half`
(their ReLU2 halves the square) and value embeddings (`ValueEmbedding`, on the layers a loop
family names).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.model.config import ModelConfig
from pretrain.model.memory import plain, recomputed

KV = tuple[Tensor, Tensor]


def rms_norm(x: Tensor, eps: float) -> Tensor:
    """Weightless RMSNorm, computed in fp32 and cast back."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back; times a learned scale unless `weight` is False."""

    def __init__(self, dim: int, eps: float, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if weight else None

    def forward(self, x: Tensor) -> Tensor:
        if self.weight is None:
            return rms_norm(x, self.eps)
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


def trunc_orthogonal_(t: Tensor, gain: float) -> Tensor:
    """Parcae's truncated orthogonal init (parcae_lm/utils/init.py `trunc_orthogonal_`): the Q of
    a QR factorisation of a truncated normal(0, 1, +-2) matrix (of its transpose when wide),
    signs fixed by R's diagonal, times `gain`."""
    with torch.no_grad():
        rows, cols = t.shape
        a = nn.init.trunc_normal_(torch.empty(rows, cols, dtype=torch.float32))
        a = a.t() if rows < cols else a
        q, r = torch.linalg.qr(a)
        q = q * torch.diagonal(r).sign()
        t.copy_((q.t() if rows < cols else q) * gain)
    return t


def rope_tables(head_dim: int, max_pos: int, theta: float,
                reverse: bool = False) -> tuple[Tensor, Tensor]:
    """cos/sin of shape [max_pos, head_dim // 2] for rotary embeddings (rotate-half layout),
    computed in fp32 as all three references do (Ouro's Qwen2 rotary, nanochat's, Huginn's
    `precompute_freqs_cis`): 1 / theta^(2i/D), times the position, cos and sin -- an fp64 table
    differs from theirs by up to 3.5e-4 at 4,096 positions. `reverse` rotates by -angle, the
    sense of nanochat's RoPE (the FLT authors' code)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    ang = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    return ang.cos(), (-ang.sin() if reverse else ang.sin())


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, S, D] by per-position tables cos/sin [S, D/2]."""
    x1, x2 = x.float().chunk(2, dim=-1)
    c, s = cos[None, None], sin[None, None]
    return torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).to(x.dtype)


class FusedLinear(nn.Linear):
    """A bias-free projection whose output rows are several blocks (q|k|v, gate|up), of the
    row counts `parts`; `rows` applies only some of them, so two inputs can use different
    blocks without extra FLOPs. (Tensor parallelism swaps in megatron's column-parallel layer
    with the same method.)"""

    def __init__(self, in_features: int, parts: tuple[int, ...]):
        super().__init__(in_features, sum(parts), bias=False)
        self.parts = parts

    def rows(self, x: Tensor, start: int, stop: int | None) -> Tensor:
        return F.linear(x, self.weight[start:stop])


class ValueEmbedding(nn.Module):
    """Parcae's value embeddings (parcae_lm/modules/mixer.py `CausalSelfAttention`): a table of
    one vector per token and KV head, added to the attention's values through a gate read from
    the first 32 channels of the layer's normed input,
    v[kv head j] += 2 sigmoid(G x[:32])_j table(ids)[j]. The table is an nn.Embedding
    (N(0, 1)) and G an nn.Linear (uniform, kaiming's default), initialised as theirs are.
    Tensor parallelism gives each rank its KV heads' columns and gate rows (and gathers the
    gate's input along the sequence under sequence parallelism: `gate_input`)."""

    GATE_CHANNELS = 32

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_kv, self.hd = cfg.num_kv_heads, cfg.kv_channels
        self.table = nn.Embedding(cfg.vocab_size, self.n_kv * self.hd)
        self.gate = nn.Linear(self.GATE_CHANNELS, self.n_kv, bias=False)

    def gate_input(self, x: Tensor) -> Tensor:
        return x[..., :self.GATE_CHANNELS]

    def forward(self, x: Tensor, ids: Tensor) -> Tensor:
        """What the values [n, B, kv heads, D] gain, from the normed input x [n, B, H] (a
        sequence shard under SP) and the tokens ids [B, n]."""
        n, b = ids.shape[1], ids.shape[0]
        gate = 2 * torch.sigmoid(self.gate(self.gate_input(x)))
        return gate[..., None] * self.table(ids.t()).view(n, b, self.n_kv, self.hd)


class Attention(nn.Module):
    """Causal grouped-query attention over `scaled_dot_product_attention`.

    Activations are sequence-first, [S, B, H] (Megatron's layout, which sequence parallelism
    shards along S). Q, K and V come from one fused projection, so tensor parallelism needs
    one collective for all three; `n_heads`/`n_kv` are the heads held by this module (all of
    them, or one tensor-parallel rank's share)."""

    def __init__(self, cfg: ModelConfig, value_embedding: bool = False):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.kv_channels
        self.qk_norm, self.eps = cfg.qk_norm, cfg.qk_norm_eps or cfg.norm_eps
        self.recompute_core = False  # `train.recompute: selective` (model/memory.py)
        q, kv = self.n_heads * self.hd, self.n_kv * self.hd
        self.qkv_proj = FusedLinear(cfg.hidden_size, (q, kv, kv))
        # Huginn's qk_bias: added to the queries and keys of every head before RoPE ([q | k])
        self.qk_bias = nn.Parameter(torch.zeros(q + kv)) if cfg.qk_bias else None
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=False)
        self.value_embed = ValueEmbedding(cfg) if value_embedding else None

    def _project(self, x: Tensor, q_input: Tensor | None) -> tuple[Tensor, Tensor]:
        """(q, kv) projections; queries from `q_input` when given, keys/values from x."""
        q_width = self.n_heads * self.hd
        if q_input is None:
            qkv = self.qkv_proj(x)
            return qkv[..., :q_width], qkv[..., q_width:]
        return self.qkv_proj.rows(q_input, 0, q_width), self.qkv_proj.rows(x, q_width, None)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        past: KV | None = None,
        frozen: tuple[Tensor, Tensor, Tensor] | None = None,
        q_input: Tensor | None = None,
        keys: Tensor | None = None,
        ids: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """x: [n, B, H] at positions len(past)..len(past)+n-1 (normed by the caller).

        past:    keys/values of earlier positions (a KV cache), prepended.
        frozen:  (mask [B, n], k, v): tokens that already exited keep these keys/values.
        q_input: queries come from this [n, B, H] instead of x (FLT).
        keys:    [B, past + n], False at a batch's left padding: no query attends to those
                 keys (a padding query sees itself alone, so no row of scores is empty).
        ids:     the tokens [B, n], read by a value embedding.
        Returns (output [n, B, H], keys, values) with keys/values [B, heads, past + n, D].
        """
        q, kv = self._project(x, q_input)
        n, b = q.shape[:2]
        k, v = kv.split([self.n_kv * self.hd, self.n_kv * self.hd], -1)
        if self.qk_bias is not None:
            bq, bk = self.qk_bias.split([self.n_heads * self.hd, self.n_kv * self.hd])
            q, k = q + bq, k + bk
        q = q.view(n, b, self.n_heads, self.hd).permute(1, 2, 0, 3)
        k = k.view(n, b, self.n_kv, self.hd).permute(1, 2, 0, 3)
        v = v.view(n, b, self.n_kv, self.hd)
        if self.value_embed is not None:
            v = v + self.value_embed(x, ids)
        v = v.permute(1, 2, 0, 3)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.qk_norm:
            q, k = rms_norm(q, self.eps), rms_norm(k, self.eps)
        if frozen is not None:
            mask, fk, fv = frozen
            keep = mask[:, None, :, None]
            k, v = torch.where(keep, fk, k), torch.where(keep, fv, v)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        seen = k.shape[2]
        core = recomputed if self.recompute_core else plain
        if seen == n and keys is None:
            out = core(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
        else:
            q_pos = torch.arange(seen - n, seen, device=x.device)[:, None]
            k_pos = torch.arange(seen, device=x.device)[None, :]
            allowed = k_pos <= q_pos  # [n, seen]
            if keys is not None:
                allowed = allowed & (keys[:, None, None, :] | (k_pos == q_pos))  # [B, 1, n, seen]
            out = core(F.scaled_dot_product_attention, q, k, v, attn_mask=allowed,
                       enable_gqa=True)
        out = out.permute(2, 0, 1, 3).reshape(n, b, self.n_heads * self.hd)
        return self.o_proj(out), k, v


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up fused into one projection ([gate; up])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = FusedLinear(cfg.hidden_size, (cfg.ffn_hidden_size,) * 2)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class ReluSquared(nn.Module):
    """down(relu(up(x))^2) (the FLT authors' MLP, from nanochat); with `half` the square is
    halved first (Parcae's ReLU2: relu(x)^2 * 0.5)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)
        self.half = cfg.mlp == "relu2_half"

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.up_proj(x)).square()
        return self.down_proj(act * 0.5 if self.half else act)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; with `sandwich_norm` a second norm per sublayer: on its output,
    x + N2(attn(N1 x)) (Ouro), or on the residual sum, N2(x + attn(N1 x)) (`sandwich_style:
    huginn`, Huginn's SandwichBlock). With `q_input` (FLT) the attention's queries come from
    attn_norm(q_input). `value_embedding`: the attention has one (Parcae)."""

    def __init__(self, cfg: ModelConfig, value_embedding: bool = False):
        super().__init__()

        def norm():
            return RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_weights)

        self.attn_norm = norm()
        self.attn = Attention(cfg, value_embedding)
        self.mlp_norm = norm()
        self.mlp = SwiGLU(cfg) if cfg.mlp == "swiglu" else ReluSquared(cfg)
        self.attn_post_norm = norm() if cfg.sandwich_norm else None
        self.mlp_post_norm = norm() if cfg.sandwich_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.norm_sum = cfg.sandwich_style == "huginn"
        self.branch_scale = 1.0  # epsilon of x + epsilon f(x) (model.residual_scale; looped.py)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, q_input: Tensor | None = None,
                **kv) -> tuple[Tensor, Tensor, Tensor]:
        q = None if q_input is None else self.attn_norm(q_input)
        a, k, v = self.attn(self.attn_norm(x), cos, sin, q_input=q, **kv)
        x = self._residual(x, a, self.attn_post_norm)
        return self._residual(x, self.mlp(self.mlp_norm(x)), self.mlp_post_norm), k, v

    def _residual(self, x: Tensor, branch: Tensor, post_norm: RMSNorm | None) -> Tensor:
        if post_norm is None:
            return x + self._scaled(self.drop(branch))
        if self.norm_sum:
            return post_norm(x + self._scaled(self.drop(branch)))
        return x + self._scaled(self.drop(post_norm(branch)))

    def _scaled(self, branch: Tensor) -> Tensor:
        """What the residual adds: the branch, times epsilon where one is set."""
        return branch if self.branch_scale == 1.0 else branch * self.branch_scale
