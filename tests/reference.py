"""An independent re-statement of the model's equations from its raw weights (explicit softmax
attention, loops written out), used as the reference the real model must match."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig


def _rms(x, w, eps):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta):
    d, s = x.shape[-1], x.shape[2]
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float64), inv)
    cos, sin = ang.cos().float(), ang.sin().float()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)


def _attend(q, k, v, first=None):
    rep = q.shape[1] // k.shape[1]
    s, d = q.shape[2], q.shape[3]
    future = torch.ones(s, s).triu(1).bool()
    keys, vals = [k], [v]
    if first is not None:
        keys, vals = [first[0], k], [first[1], v]
    scores = [(q @ kk.repeat_interleave(rep, 1).transpose(-1, -2) / math.sqrt(d))
              .masked_fill(future, float("-inf")) for kk in keys]
    w = torch.softmax(torch.cat(scores, -1), -1)
    return w @ torch.cat([vv.repeat_interleave(rep, 1) for vv in vals], 2)


def _layer(sd, pre, x, cfg: ModelConfig, first=None):
    b, s, _ = x.shape
    hd, eps = cfg.kv_channels, cfg.norm_eps
    h = _rms(x, sd[pre + "attn_norm.weight"], eps)
    wq, wk, wv = sd[pre + "attn.qkv_proj.weight"].split(
        [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd])
    q = (h @ wq.T).view(b, s, -1, hd).transpose(1, 2)
    k = (h @ wk.T).view(b, s, -1, hd).transpose(1, 2)
    v = (h @ wv.T).view(b, s, -1, hd).transpose(1, 2)
    q, k = _rope(q, cfg.rope_theta), _rope(k, cfg.rope_theta)
    a = _attend(q, k, v, first).transpose(1, 2).reshape(b, s, -1) @ sd[pre + "attn.o_proj.weight"].T
    if cfg.sandwich_norm:
        a = _rms(a, sd[pre + "attn_post_norm.weight"], eps)
    x = x + a
    h = _rms(x, sd[pre + "mlp_norm.weight"], eps)
    wg, wu = sd[pre + "mlp.gate_up_proj.weight"].chunk(2)
    m = (F.silu(h @ wg.T) * (h @ wu.T)) @ sd[pre + "mlp.down_proj.weight"].T
    if cfg.sandwich_norm:
        m = _rms(m, sd[pre + "mlp_post_norm.weight"], eps)
    return x + m, (k, v)


def reference_forward(model, ids, loops=None):
    """Returns ([logits_t [S, B, V]], gate_logits [R, S, B]) (the model's sequence-first
    layout), computed batch-first from model.state_dict() alone."""
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    loops = loops or cfg.loops
    x = sd["embed.weight"][ids]
    for i in range(cfg.prelude_layers):
        x, _ = _layer(sd, f"prelude.{i}.", x, cfg)
    head = sd["embed.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    first_kv, consumed = {}, {}
    logits, gates = [], []
    for t in range(loops):
        for i in range(cfg.num_layers):
            if cfg.fully_looped:
                if t > 0:
                    x = (x + consumed[i]) / 2
                consumed[i] = x
            inj = first_kv[i] if (cfg.attention_injection and t > 0) else None
            x, kv = _layer(sd, f"block.{i}.", x, cfg, inj)
            if t == 0:
                first_kv[i] = kv
        y = x
        for i in range(cfg.coda_layers):
            y, _ = _layer(sd, f"coda.{i}.", y, cfg)
        n = _rms(y, sd["norm.weight"], cfg.norm_eps)
        logits.append((n @ head.T).transpose(0, 1))
        gates.append(((n @ sd["gate.weight"].T).squeeze(-1) + sd["gate.bias"]).t())
    return logits, torch.stack(gates)
