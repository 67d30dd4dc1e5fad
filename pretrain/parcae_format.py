"""Parcae's tensor names, both ways: the state dict of their `Parcae` module
(sandyresearch/parcae, parcae_lm/models/parcae/parcae.py, modules/{blocks,mixer,mlp,
injection}.py) for a `model.loop_mode: parcae` model.

Weight names (ours -> theirs; i within each segment, j = a layer's index in prelude + block +
coda, which keys their value embeddings):

  embed.weight                       transformer.wte.weight (lm_head.weight: tied, or its own)
  prelude.i. / block.i. / coda.i.    transformer.prelude.i. / core_block.i. / coda.i.
    attn_norm, mlp_norm                norm_1, norm_2 (their pre-norm block)
    attn.qkv_proj.weight [q|k|v]       attn.c_q / c_k / c_v.weight (q, k rows permuted, below)
    attn.o_proj.weight                 attn.c_proj.weight
    attn.value_embed.gate.weight       attn.ve_gate.weight
    attn.value_embed.table.weight      value_embeds.j.weight
    mlp.up_proj / down_proj.weight     mlp.fc / proj.weight
  prelude_norm.weight                transformer.ln_prelude.weight
  injection.A_log, dt_bias, B        transformer.adapter.A_log, dt_bias, B
  readout_proj.weight                transformer.C.weight
  norm.weight                        transformer.ln_f.weight
  (gate.*: Parcae has no exit gate; not written, zero on the way in)

RoPE: as Huginn's (pretrain/huginn_format.py `pair_order`): their adjacent pairs, our halves,
one fixed permutation of each query and key head's rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.config import ModelConfig
from pretrain.huginn_format import pair_order
from pretrain.model.families import family_class

_SEGMENTS = {"prelude": "prelude", "block": "core_block", "coda": "coda"}
_PLAIN = {"attn_norm.weight": "norm_1.weight", "mlp_norm.weight": "norm_2.weight",
          "attn.o_proj.weight": "attn.c_proj.weight", "attn.value_embed.gate.weight":
          "attn.ve_gate.weight", "mlp.up_proj.weight": "mlp.fc.weight",
          "mlp.down_proj.weight": "mlp.proj.weight"}
_TOP = {"embed.weight": "transformer.wte.weight", "prelude_norm.weight": "transformer.ln_prelude.weight",
        "injection.A_log": "transformer.adapter.A_log",
        "injection.dt_bias": "transformer.adapter.dt_bias", "injection.B": "transformer.adapter.B",
        "readout_proj.weight": "transformer.C.weight", "norm.weight": "transformer.ln_f.weight"}


def _unique_index(m: ModelConfig, segment: str, i: int) -> int:
    return {"prelude": 0, "block": m.prelude_layers, "coda": m.prelude_layers + m.num_layers}[segment] + i


def _split(m: ModelConfig) -> list[int]:
    d = m.kv_channels
    return [m.num_heads * d, m.num_kv_heads * d, m.num_kv_heads * d]


def _rows(heads: int, d: int) -> Tensor:
    """Our rows of a q or k projection are theirs[_rows]: each head's rows in pair order."""
    return torch.cat([h * d + pair_order(d) for h in range(heads)])


def to_parcae(m: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our full (single-process) state dict -> their module's tensors."""
    d = m.kv_channels
    out = {theirs: state[ours] for ours, theirs in _TOP.items()}
    out["lm_head.weight"] = state["lm_head.weight"]
    for name, value in state.items():
        segment, _, rest = name.partition(".")
        if segment not in _SEGMENTS:
            continue
        i, rest = rest.split(".", 1)
        prefix = f"transformer.{_SEGMENTS[segment]}.{i}."
        if rest == "attn.qkv_proj.weight":
            q, k, v = value.split(_split(m))
            out[prefix + "attn.c_q.weight"] = q[torch.argsort(_rows(m.num_heads, d))]
            out[prefix + "attn.c_k.weight"] = k[torch.argsort(_rows(m.num_kv_heads, d))]
            out[prefix + "attn.c_v.weight"] = v
        elif rest == "attn.value_embed.table.weight":
            out[f"value_embeds.{_unique_index(m, segment, int(i))}.weight"] = value
        else:
            out[prefix + _PLAIN[rest]] = value
    return out


def from_parcae(m: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Their module's tensors -> our state dict (the inverse of `to_parcae` for the weights our
    model has; the exit gate starts at 0)."""
    family = family_class("parcae")(m)
    d = m.kv_channels
    out = {ours: tensors[theirs] for ours, theirs in _TOP.items()}
    out["lm_head.weight"] = tensors["lm_head.weight"]
    out["gate.weight"], out["gate.bias"] = torch.zeros(1, m.hidden_size), torch.zeros(1)
    counts = {"prelude": m.prelude_layers, "block": m.num_layers, "coda": m.coda_layers}
    for ours, theirs in _SEGMENTS.items():
        for i in range(counts[ours]):
            src, dst = f"transformer.{theirs}.{i}.", f"{ours}.{i}."
            ve = family.value_embedding(ours, i)
            for a, b in _PLAIN.items():
                if ve or "value_embed" not in a:
                    out[dst + a] = tensors[src + b]
            out[dst + "attn.qkv_proj.weight"] = torch.cat((
                tensors[src + "attn.c_q.weight"][_rows(m.num_heads, d)],
                tensors[src + "attn.c_k.weight"][_rows(m.num_kv_heads, d)],
                tensors[src + "attn.c_v.weight"]))
            if ve:
                out[dst + "attn.value_embed.table.weight"] = \
                    tensors[f"value_embeds.{_unique_index(m, ours, i)}.weight"]
    return out
