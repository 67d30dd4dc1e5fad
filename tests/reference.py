"""An independent re-statement of the model's equations from its raw weights (explicit softmax
attention, batch-first, every loop mode written out), used as the reference the real model
must match. Written from the papers' descriptions (Ouro arXiv 2510.25741 and its released
modeling code's forward; the Fully Looped Transformer arXiv 2605.18797 and its authors' model
types FLT, FLT_res, LT, LT_i, LT_ia; Huginn-0125 arXiv 2502.05171 and its released
raven_modeling_minimal.py, in its own tensor names and RoPE; Parcae arXiv 2604.12946 and its
released parcae_lm/models/parcae/parcae.py, likewise), not from pretrain/model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pretrain.config import ModelConfig


def _rms(x, w, eps):
    y = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def _rope(x, theta, reverse=False):
    """Rotate each (x_i, x_{i+d/2}) pair by +pos * theta^(-2i/d) (Ouro's rotate-half), or by
    the negative angle (nanochat's apply_rotary_emb: y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos)."""
    d, s = x.shape[-1], x.shape[2]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # fp32, as all
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)  # three releases compute it
    cos, sin = ang.cos(), ang.sin()
    a, b = x[..., : d // 2], x[..., d // 2 :]
    if reverse:
        return torch.cat((a * cos + b * sin, -a * sin + b * cos), -1)
    return torch.cat((a * cos - b * sin, a * sin + b * cos), -1)


def _attend(q, k, v):
    rep = q.shape[1] // k.shape[1]
    s, d = q.shape[2], q.shape[3]
    future = torch.ones(s, s).triu(1).bool()
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(future, float("-inf"))
    return torch.softmax(scores, -1) @ v


def _layer(sd, pre, x, cfg: ModelConfig, h=None, ids=None):
    """One decoder layer; with h, the queries come from norm(h) (FLT); a value embedding
    (Parcae) adds 2 sigmoid(G xn[:32]) table[ids] to each KV head's values."""
    b, s, _ = x.shape
    hd, eps = cfg.kv_channels, cfg.norm_eps

    def w(name):
        return sd.get(pre + name)  # absent: a weightless norm

    xn = _rms(x, w("attn_norm.weight"), eps)
    qn = xn if h is None else _rms(h, w("attn_norm.weight"), eps)
    wq, wk, wv = sd[pre + "attn.qkv_proj.weight"].split(
        [cfg.num_heads * hd, cfg.num_kv_heads * hd, cfg.num_kv_heads * hd])
    q, k = qn @ wq.T, xn @ wk.T
    if cfg.qk_bias:  # Huginn: a bias on every query and key before RoPE
        bq, bk = sd[pre + "attn.qk_bias"].split([wq.shape[0], wk.shape[0]])
        q, k = q + bq, k + bk
    q = q.view(b, s, -1, hd).transpose(1, 2)
    k = k.view(b, s, -1, hd).transpose(1, 2)
    v = (xn @ wv.T).view(b, s, -1, hd)
    if pre + "attn.value_embed.table.weight" in sd:
        gate = 2 * torch.sigmoid(xn[..., :32] @ sd[pre + "attn.value_embed.gate.weight"].T)
        v = v + gate[..., None] * sd[pre + "attn.value_embed.table.weight"][ids].view(b, s, -1, hd)
    v = v.transpose(1, 2)
    q, k = _rope(q, cfg.rope_theta, cfg.rope_reverse), _rope(k, cfg.rope_theta, cfg.rope_reverse)
    if cfg.qk_norm:
        qk_eps = cfg.qk_norm_eps or eps
        q, k = _rms(q, None, qk_eps), _rms(k, None, qk_eps)
    a = _attend(q, k, v).transpose(1, 2).reshape(b, s, -1) @ sd[pre + "attn.o_proj.weight"].T
    sum_norm = cfg.sandwich_style == "huginn"  # Huginn: N2(x + a), Ouro: x + N2(a)
    if sum_norm:
        x = _rms(x + a, w("attn_post_norm.weight"), eps)
    else:
        x = x + (_rms(a, w("attn_post_norm.weight"), eps) if cfg.sandwich_norm else a)
    xn = _rms(x, w("mlp_norm.weight"), eps)
    if cfg.mlp == "swiglu":
        wg, wu = sd[pre + "mlp.gate_up_proj.weight"].chunk(2)
        m = (F.silu(xn @ wg.T) * (xn @ wu.T)) @ sd[pre + "mlp.down_proj.weight"].T
    else:
        half = 0.5 if cfg.mlp == "relu2_half" else 1.0  # Parcae's ReLU2 halves the square
        m = half * torch.relu(xn @ sd[pre + "mlp.up_proj.weight"].T) ** 2 @ sd[pre + "mlp.down_proj.weight"].T
    if sum_norm:
        return _rms(x + m, w("mlp_post_norm.weight"), eps)
    return x + (_rms(m, w("mlp_post_norm.weight"), eps) if cfg.sandwich_norm else m)


def reference_forward(model, ids, loops=None, state=None):
    """Returns ([logits_t [S, B, V]], gate_logits [R, S, B]) (the model's sequence-first
    layout), computed batch-first from model.state_dict() alone; huginn and parcae start from
    `state` [B, S, H] (default zeros: model.state_std 0)."""
    cfg: ModelConfig = model.cfg
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    loops = loops or cfg.loops
    eps, mode = cfg.norm_eps, cfg.loop_mode

    def nu(x):  # the parameter-free norm of the FLT modes
        return _rms(x, None, eps)

    e = sd["embed.weight"][ids] * cfg.embed_scale
    for i in range(cfg.prelude_layers):
        e = _layer(sd, f"prelude.{i}.", e, cfg, ids=ids)
    if mode == "parcae":
        e = _rms(e, sd["prelude_norm.weight"], eps)
        dt = F.softplus(sd["injection.dt_bias"])
        decay = torch.exp(-dt * torch.exp(sd["injection.A_log"]))
    head = sd["embed.weight"] if cfg.tie_embeddings else sd["lm_head.weight"]
    logits, gates = [], []
    h = x = None
    for t in range(loops):
        if mode == "huginn":  # x_t = Adapter([x_{t-1}; e]), x_0 the initial state
            prev = (torch.zeros_like(e) if state is None else state) if t == 0 else x
            x = torch.cat((prev, e), -1) @ sd["adapter.weight"].T
        elif mode == "parcae":  # x_t = exp(-dt A) x_{t-1} + dt B e, x_0 the initial state
            prev = (torch.zeros_like(e) if state is None else state) if t == 0 else x
            x = prev * decay + dt * (e @ sd["injection.B"].T)
        elif mode == "ouro":  # Ouro: the normed output of a loop is the next loop's input
            x = e if t == 0 else (h if cfg.norm_between_loops else x)
        elif mode == "lt":
            x = nu(e) if t == 0 else h
        elif mode == "lt_i":
            x = nu(e) if t == 0 else nu(e + h)
        else:  # lt_ia, flt, flt_res: every loop restarts from the normed embedding
            x = nu(e)
        for i in range(cfg.num_layers):
            pre = f"block.{i}."
            if h is not None and mode == "flt_res":
                x = _layer(sd, pre, nu(x + h), cfg)
            elif h is not None and (mode == "flt" or (mode == "lt_ia" and i == 0)):
                x = _layer(sd, pre, x, cfg, h=h)
            else:
                x = _layer(sd, pre, x, cfg, ids=ids)
        h = _rms(x, sd.get("norm.weight"), eps)
        y = x @ sd["readout_proj.weight"].T if mode == "parcae" else h  # Parcae's C
        if cfg.coda_layers:
            for i in range(cfg.coda_layers):
                y = _layer(sd, f"coda.{i}.", y, cfg, ids=ids)
            y = _rms(y, sd.get("norm.weight"), eps)
        lg = y @ head.T
        if cfg.logit_softcap:
            lg = cfg.logit_softcap * torch.tanh(lg / cfg.logit_softcap)
        logits.append(lg.transpose(0, 1))
        gates.append(((y @ sd["gate.weight"].T).squeeze(-1) + sd["gate.bias"]).t())
    return logits, torch.stack(gates)


def _rope_pairs(x, theta):
    """Huginn's RoPE (raven_modeling_minimal.py `apply_rotary_emb_complex_like`): each adjacent
    pair (x_2i, x_2i+1) of a head [B, S, heads, D] rotated by pos * theta^(-2i/D)."""
    d, s = x.shape[-1], x.shape[1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.outer(torch.arange(s, dtype=torch.float32), inv)[None, :, None, :]
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack((a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()), -1).flatten(3)


def _sandwich(sd, pre, x, c):
    """Huginn's SandwichBlock from its released tensors (names of raven_modeling_minimal.py)."""
    b, s, h = x.shape
    heads, eps = c["n_heads"], c["norm_eps"]
    d = h // heads
    xn = _rms(x, sd[pre + "norm_1.weight"], eps)
    q, k, v = (xn @ sd[pre + "attn.Wqkv.weight"].T).split([h, h, h], -1)
    q, k, v = (t.view(b, s, heads, d) for t in (q, k, v))
    if c["qk_bias"]:
        q, k = q + sd[pre + "attn.qk_bias"][0], k + sd[pre + "attn.qk_bias"][1]
    q, k = _rope_pairs(q, c["rope_base"]), _rope_pairs(k, c["rope_base"])
    a = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    a = a.transpose(1, 2).reshape(b, s, h) @ sd[pre + "attn.proj.weight"].T
    x = _rms(a + x, sd[pre + "norm_2.weight"], eps)
    gate, up = (_rms(x, sd[pre + "norm_3.weight"], eps) @ sd[pre + "mlp.fc.weight"].T).chunk(2, -1)
    m = (F.silu(gate) * up) @ sd[pre + "mlp.proj.weight"].T
    return _rms(m + x, sd[pre + "norm_4.weight"], eps)


def reference_huginn(sd, c, ids, steps, state):
    """Huginn-0125's forward (arXiv 2502.05171; raven_modeling_minimal.py `forward`,
    `iterate_forward`, `core_block_forward`, `predict_from_latents`) from its released tensors
    `sd` and config.json `c`, batch-first: logits [B, S, V] after `steps` recurrences from the
    initial state `state` [B, S, H]."""
    eps, tr = c["norm_eps"], "transformer."
    e = sd[tr + "wte.weight"][ids] * math.sqrt(c["n_embd"])
    for i in range(c["n_layers_in_prelude"]):
        e = _sandwich(sd, f"{tr}prelude.{i}.", e, c)
    x = state
    for _ in range(steps):
        x = torch.cat((x, e), -1) @ sd[tr + "adapter.weight"].T
        for i in range(c["n_layers_in_recurrent_block"]):
            x = _sandwich(sd, f"{tr}core_block.{i}.", x, c)
    x = _rms(x, sd[tr + "ln_f.weight"], eps)
    for i in range(c["n_layers_in_coda"]):
        x = _sandwich(sd, f"{tr}coda.{i}.", x, c)
    x = _rms(x, sd[tr + "ln_f.weight"], eps)
    head = sd[tr + "wte.weight"] if c["tie_embeddings"] else sd["lm_head.weight"]
    return x @ head.T


def _parcae_block(sd, pre, x, c, ve):
    """Parcae's TransformerPreNormBlock (parcae_lm/modules/blocks.py, mixer.py, mlp.py) from its
    tensors; `ve` the layer's value-embedding rows [B, S, kv dim] or None."""
    b, s, h = x.shape
    heads, kv, eps = c["num_attention_heads"], c["num_key_value_heads"], c["norm_eps"]
    d = h // heads
    xn = _rms(x, sd[pre + "norm_1.weight"], eps)
    q = (xn @ sd[pre + "attn.c_q.weight"].T).view(b, s, heads, d)
    k = (xn @ sd[pre + "attn.c_k.weight"].T).view(b, s, kv, d)
    v = (xn @ sd[pre + "attn.c_v.weight"].T).view(b, s, kv, d)
    if ve is not None and pre + "attn.ve_gate.weight" in sd:
        gate = 2 * torch.sigmoid(xn[..., :32] @ sd[pre + "attn.ve_gate.weight"].T)
        v = v + gate[..., None] * ve.view(b, s, kv, d)
    q, k = _rope_pairs(q, c["rope_base"]), _rope_pairs(k, c["rope_base"])
    if c["qk_norm"]:  # F.rms_norm without weight or eps: the dtype's machine epsilon
        q, k = (F.rms_norm(t, (d,)) for t in (q, k))
    a = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    x = a.transpose(1, 2).reshape(b, s, h) @ sd[pre + "attn.c_proj.weight"].T + x
    up = _rms(x, sd[pre + "norm_2.weight"], eps) @ sd[pre + "mlp.fc.weight"].T
    return (torch.relu(up).pow(2) * 0.5) @ sd[pre + "mlp.proj.weight"].T + x


def reference_parcae(sd, c, ids, steps, state):
    """Parcae's forward (parcae.py `forward`, `iterate_forward`, `core_block_forward`;
    injection.py `DiagonalInjection`) from its module's tensors `sd` and config fields `c`,
    batch-first: logits [B, S, V] after `steps` recurrences from the state `state` [B, S, H]."""
    eps, tr = c["norm_eps"], "transformer."
    p, r, n = (c[f"n_layers_in_{s}"] for s in ("prelude", "recurrent_block", "coda"))

    def ve(j):
        w = sd.get(f"value_embeds.{j}.weight")
        return None if w is None else w[ids]

    e = sd[tr + "wte.weight"][ids]
    for i in range(p):
        e = _parcae_block(sd, f"{tr}prelude.{i}.", e, c, ve(i))
    e = _rms(e, sd[tr + "ln_prelude.weight"], eps)
    dt = F.softplus(sd[tr + "adapter.dt_bias"])
    decay = torch.exp(-dt * torch.exp(sd[tr + "adapter.A_log"]))
    x = state
    for _ in range(steps):
        x = x * decay + dt * (e @ sd[tr + "adapter.B"].T)
        for i in range(r):
            x = _parcae_block(sd, f"{tr}core_block.{i}.", x, c, ve(p + i))
    x = x @ sd[tr + "C.weight"].T
    for i in range(n):
        x = _parcae_block(sd, f"{tr}coda.{i}.", x, c, ve(p + r + i))
    head = sd.get("lm_head.weight", sd[tr + "wte.weight"])  # tied: their lm_head is wte
    return _rms(x, sd[tr + "ln_f.weight"], eps) @ head.T
