"""Huginn-0125's released format, both ways: config.json + tensor names of
`recpre/raven_modeling_minimal.py` (seal-rg/recurrent-pretraining; weights
tomg-group-umd/huginn-0125), for a `model.loop_mode: huginn` model.

Weight names (ours -> theirs; P prelude, C coda layers, i within each segment):

  embed.weight                      transformer.wte.weight (lm_head.weight too when untied)
  prelude.i. / block.i. / coda.i.   transformer.prelude.i. / core_block.i. / coda.i.
    attn_norm, attn_post_norm,        norm_1, norm_2, norm_3, norm_4 (their SandwichBlock:
    mlp_norm, mlp_post_norm           x = norm_2(x + attn(norm_1 x)); norm_4(x + mlp(norm_3 x)))
    attn.qkv_proj.weight              attn.Wqkv.weight (q and k rows of each head permuted, below)
    attn.qk_bias [q | k]              attn.qk_bias [2, 1, heads, head_dim] (permuted alike)
    attn.o_proj.weight                attn.proj.weight
    mlp.gate_up_proj.weight           mlp.fc.weight (their chunk(2): silu(first) * second)
    mlp.down_proj.weight              mlp.proj.weight
  adapter.weight                    transformer.adapter.weight
  norm.weight                       transformer.ln_f.weight (their final norm, used twice)
  (gate.*: Huginn has no exit gate; not exported, zero-initialised on import)
  freqs_cis                         written for their persistent buffer (cos, sin of RoPE)

RoPE: theirs rotates adjacent pairs (2i, 2i+1) of a head, ours (i, i + D/2), both by
pos * base^(-2i/D). Our head dimension j holds their dimension PERM[j] (evens, then odds), so the
scores q . k -- all attention reads of q and k -- are equal. Their config derives the embedding
scale sqrt(n_embd) and the state's std sqrt(2 / (5 n_embd)) from the width, so a model with
other values has no counterpart and is refused; so are GQA (their k bias is per query head)
and anything else their format cannot say.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from core.config_schema import Override
from pretrain.config import Config, ConfigError, ModelConfig
from pretrain.formats import ReleaseFormat, config_int

MODELING_FILES = ("raven_config_minimal.py", "raven_modeling_minimal.py")
_NORMS = {"attn_norm.weight": "norm_1.weight", "attn_post_norm.weight": "norm_2.weight",
          "mlp_norm.weight": "norm_3.weight", "mlp_post_norm.weight": "norm_4.weight"}
_PLAIN = {**_NORMS, "attn.o_proj.weight": "attn.proj.weight",
          "mlp.gate_up_proj.weight": "mlp.fc.weight", "mlp.down_proj.weight": "mlp.proj.weight"}
_SEGMENTS = {"prelude": "prelude", "block": "core_block", "coda": "coda"}
# every model field their format fixes, and the value it fixes it to
_FIXED = {"loop_mode": "huginn", "sandwich_norm": True, "sandwich_style": "huginn",
          "qk_norm": False, "norm_weights": True, "mlp": "swiglu", "logit_softcap": 0.0,
          "rope_reverse": False, "head_dim": 0, "residual_scale": 0.0}


def _check(m: ModelConfig) -> None:
    for name, value in _FIXED.items():
        if getattr(m, name) != value:
            raise ConfigError(f"model.{name}: {getattr(m, name)!r} has no counterpart in "
                              f"Huginn's format (it holds {name}={value!r} only)")
    derived = {"embed_scale": math.sqrt(m.hidden_size),
               "state_std": math.sqrt(2 / (5 * m.hidden_size))}
    for name, value in derived.items():
        if not math.isclose(getattr(m, name), value, rel_tol=1e-6):
            raise ConfigError(f"model.{name}: {getattr(m, name)!r}: Huginn's format derives it "
                              f"from the width ({value!r} at hidden_size {m.hidden_size})")
    if m.num_kv_heads != m.num_heads:
        raise ConfigError(f"model.num_kv_heads: {m.num_kv_heads}: Huginn's format has one key "
                          f"bias per query head (num_kv_heads = num_heads = {m.num_heads})")


def pair_order(head_dim: int) -> Tensor:
    """Our dimension j of a head is their dimension PERM[j]: (0, 2, .., D-2, 1, 3, .., D-1)."""
    return torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))


def _qk_rows(m: ModelConfig) -> Tensor:
    """Our [q | k | v] projection is theirs[_qk_rows]: each q and k head's rows permuted."""
    perm = pair_order(m.kv_channels)
    heads = m.num_heads + m.num_kv_heads  # q and k heads; v keeps its order
    rows = [h * m.kv_channels + perm for h in range(heads)]
    rows.append(torch.arange(heads * m.kv_channels, (heads + m.num_kv_heads) * m.kv_channels))
    return torch.cat(rows)


def layer_weights(state: dict[str, Tensor]) -> Iterator[tuple[str, int, str, Tensor]]:
    """(segment, index, the name within the layer, value) of every prelude, block and coda
    layer weight of our state dict ('block.1.attn.o_proj.weight' -> block, 1, attn.o_proj...)."""
    for name, value in state.items():
        segment, _, rest = name.partition(".")
        if segment in ("prelude", "block", "coda"):
            i, rest = rest.split(".", 1)
            yield segment, int(i), rest, value


def _freqs_cis(m: ModelConfig) -> Tensor:
    """Their RoPE buffer [1, max_seq_len, 1, D/2, 2] (cos, sin)."""
    d = m.kv_channels
    inv = 1.0 / (m.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.outer(torch.arange(m.max_seq_len, dtype=torch.float32), inv)
    return torch.stack((ang.cos(), ang.sin()), dim=-1)[None, :, None]


def to_huginn(m: ModelConfig, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our full (single-process) state dict -> their tensors."""
    _check(m)
    heads, d = m.num_heads, m.kv_channels
    to_theirs = torch.argsort(_qk_rows(m))
    out = {"transformer.wte.weight": state["embed.weight"],
           "transformer.adapter.weight": state["adapter.weight"],
           "transformer.ln_f.weight": state["norm.weight"], "freqs_cis": _freqs_cis(m)}
    if not m.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    for segment, i, rest, value in layer_weights(state):
        prefix = f"transformer.{_SEGMENTS[segment]}.{i}."
        if rest == "attn.qkv_proj.weight":
            out[prefix + "attn.Wqkv.weight"] = value[to_theirs].contiguous()
        elif rest == "attn.qk_bias":
            back = torch.argsort(pair_order(d))
            out[prefix + "attn.qk_bias"] = value.view(2, 1, heads, d)[..., back].contiguous()
        else:
            out[prefix + _PLAIN[rest]] = value
    return out


def from_huginn(m: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Their tensors -> our state dict (the inverse of `to_huginn`; the gate starts at 0)."""
    to_ours = _qk_rows(m)
    out = {"embed.weight": tensors["transformer.wte.weight"],
           "adapter.weight": tensors["transformer.adapter.weight"],
           "norm.weight": tensors["transformer.ln_f.weight"],
           "lm_head.weight": tensors["transformer.wte.weight" if m.tie_embeddings
                                     else "lm_head.weight"],
           "gate.weight": torch.zeros(1, m.hidden_size), "gate.bias": torch.zeros(1)}
    counts = {"prelude": m.prelude_layers, "block": m.num_layers, "coda": m.coda_layers}
    for ours, theirs in _SEGMENTS.items():
        for i in range(counts[ours]):
            src, dst = f"transformer.{theirs}.{i}.", f"{ours}.{i}."
            for a, b in _PLAIN.items():
                out[dst + a] = tensors[src + b]
            out[dst + "attn.qkv_proj.weight"] = tensors[src + "attn.Wqkv.weight"][to_ours]
            if m.qk_bias:
                bias = tensors[src + "attn.qk_bias"]
                out[dst + "attn.qk_bias"] = bias[..., pair_order(m.kv_channels)].reshape(-1)
    return out


def huginn_config(cfg: Config) -> dict:
    """Their config.json (RavenConfig's fields) for our model; `auto_map` names their modeling
    files, which the user places beside the weights (README: Huginn's format)."""
    m = cfg.model
    return {"architectures": ["RavenForCausalLM"], "model_type": "huginn_raven",
            "n_embd": m.hidden_size, "n_heads": m.num_heads,
            "n_layers": m.prelude_layers + m.num_layers + m.coda_layers,
            "block_size": m.max_seq_len, "vocab_size": m.vocab_size,
            "padding_multiple": 1, "tie_embeddings": m.tie_embeddings,
            "intermediate_size": m.ffn_hidden_size, "bias": False, "norm_eps": m.norm_eps,
            "qk_bias": m.qk_bias, "n_layers_in_prelude": m.prelude_layers,
            "n_layers_in_recurrent_block": m.num_layers, "n_layers_in_coda": m.coda_layers,
            "mean_recurrence": m.loops, "mean_backprop_depth": cfg.recurrence.backprop or m.loops,
            "rope_base": m.rope_theta, "block_class_name": "SandwichBlock",
            "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU", "injection_type": "linear",
            "torch_dtype": "float32",
            "auto_map": {"AutoConfig": "raven_config_minimal.RavenConfig",
                         "AutoModelForCausalLM": "raven_modeling_minimal.RavenForCausalLM"}}


def model_overrides(hf: dict) -> list[Override]:
    """Their config.json as our `model.*` / `objective.*` / `recurrence.*` overrides."""
    h = config_int(hf, "n_embd", least=1)
    depth = config_int(hf, "mean_backprop_depth", default=0)
    try:
        pairs = {"vocab_size": hf["vocab_size"], "hidden_size": h, "num_heads": hf["n_heads"],
                 "num_kv_heads": hf["n_heads"], "ffn_hidden_size": hf["intermediate_size"],
                 "prelude_layers": hf["n_layers_in_prelude"],
                 "num_layers": hf["n_layers_in_recurrent_block"],
                 "coda_layers": hf["n_layers_in_coda"], "loops": hf["mean_recurrence"],
                 "max_seq_len": hf["block_size"], "rope_theta": hf["rope_base"],
                 "norm_eps": hf["norm_eps"], "qk_bias": hf["qk_bias"],
                 "tie_embeddings": hf["tie_embeddings"], "loop_mode": "huginn",
                 "sandwich_norm": True, "sandwich_style": "huginn",
                 "embed_scale": math.sqrt(h), "state_std": math.sqrt(2 / (5 * h)),
                 "init_std": math.sqrt(2 / (5 * h)), "init": "huginn"}
    except KeyError as e:
        raise ConfigError(f"config.json: missing field {e.args[0]!r}") from None
    if hf.get("bias", False):
        raise ConfigError("config.json: bias true: Huginn's biased adapter has no counterpart")
    return [(f"model.{k}", v) for k, v in pairs.items()] + [
        ("objective.kind", "last"), ("recurrence.sampler", "poisson_lognormal"),
        ("recurrence.backprop", depth)]


FORMAT = ReleaseFormat(to_huginn, huginn_config, from_huginn, model_overrides,
                       lambda hf: hf.get("model_type") == "huginn_raven")
