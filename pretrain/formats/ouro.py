"""The Ouro release's format (`OuroForCausalLM`): the loop families without a format of
their own are written in it, or refused naming the field it cannot hold.

Weight names (ours -> Ouro's; i over the shared block's layers):

  embed.weight                       model.embed_tokens.weight
  block.i.attn_norm.weight           model.layers.i.input_layernorm.weight
  block.i.attn.qkv_proj.weight       model.layers.i.self_attn.{q,k,v}_proj.weight (rows split)
  block.i.attn.o_proj.weight         model.layers.i.self_attn.o_proj.weight
  block.i.attn_post_norm.weight      model.layers.i.input_layernorm_2.weight   (sandwich norm)
  block.i.mlp_norm.weight            model.layers.i.post_attention_layernorm.weight
  block.i.mlp.gate_up_proj.weight    model.layers.i.mlp.{gate,up}_proj.weight (rows split)
  block.i.mlp.down_proj.weight       model.layers.i.mlp.down_proj.weight
  block.i.mlp_post_norm.weight       model.layers.i.post_attention_layernorm_2.weight
  norm.weight                        model.norm.weight
  gate.{weight,bias}                 model.early_exit_gate.{weight,bias}
  lm_head.weight                     lm_head.weight (absent when tie_word_embeddings)

config.json fields: hidden_size, num_hidden_layers (the shared block), num_attention_heads,
num_key_value_heads, head_dim, intermediate_size, vocab_size, total_ut_steps (= loops R),
early_exit_threshold, max_position_embeddings, rope_theta, rms_norm_eps,
tie_word_embeddings, hidden_act "silu", and `auto_map` pointing at the modeling files the
export writes beside the weights (pretrain/formats/hf_files: our own `transformers`
implementation of the same function under Ouro's class names), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads and generates without
this framework (transformers 4.5x and 5.x). RoPE is rotate-half in both. Variants Ouro has no
names for (another loop mode, prelude/coda layers, the FLT recipe's layers) are refused, not
approximated.
"""

from __future__ import annotations

import torch

from core.config_schema import Override
from core.weight_layout import FUSED_BLOCKS, split_for
from pretrain.config import Config, ConfigError, ModelConfig
from pretrain.formats import ReleaseFormat

MODELING_FILES = ("configuration_ouro.py", "modeling_ouro.py")
_LAYER = {"attn_norm.weight": "input_layernorm.weight",
          "attn_post_norm.weight": "input_layernorm_2.weight",
          "mlp_norm.weight": "post_attention_layernorm.weight",
          "mlp_post_norm.weight": "post_attention_layernorm_2.weight",
          "attn.o_proj.weight": "self_attn.o_proj.weight",
          "mlp.down_proj.weight": "mlp.down_proj.weight"}
_FUSED = {"attn.qkv_proj.weight": "self_attn.{}_proj.weight",
          "mlp.gate_up_proj.weight": "mlp.{}_proj.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "gate.weight": "model.early_exit_gate.weight", "gate.bias": "model.early_exit_gate.bias",
        "lm_head.weight": "lm_head.weight"}


# what the Ouro format holds: any other value of these fields is refused, naming the field
OURO_FORMAT = {"loop_mode": "ouro", "norm_between_loops": True, "prelude_layers": 0,
               "coda_layers": 0, "sandwich_norm": True, "qk_norm": False, "norm_weights": True,
               "mlp": "swiglu", "logit_softcap": 0.0, "rope_reverse": False,
               "sandwich_style": "ouro", "qk_bias": False, "embed_scale": 1.0,
               "residual_scale": 0.0}


def _check_exportable(m: ModelConfig) -> None:
    for name, value in OURO_FORMAT.items():
        if getattr(m, name) != value:
            raise ConfigError(f"model.{name}: {getattr(m, name)!r} has no counterpart in the Ouro "
                              f"format (it holds {name}={value!r} only)")


def to_hf(m: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (single-process) state dict -> Ouro's tensors."""
    _check_exportable(m)
    out = {}
    for name, value in state.items():
        if name in _TOP:
            if not (name == "lm_head.weight" and m.tie_embeddings):
                out[_TOP[name]] = value
            continue
        _, i, rest = name.split(".", 2)
        prefix = f"model.layers.{i}."
        if rest in _LAYER:
            out[prefix + _LAYER[rest]] = value
        else:
            split = split_for(m, name)
            blocks = FUSED_BLOCKS[rest.split(".")[-2]]
            for block, piece in zip(blocks, value.split(list(split.parts), dim=split.dim),
                                    strict=True):
                out[prefix + _FUSED[rest].format(block)] = piece.contiguous()
    return out


def from_hf(m: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ouro's tensors -> our state dict (the exact inverse of `to_hf`)."""
    out = {ours: tensors[theirs] for ours, theirs in _TOP.items()
           if theirs in tensors and not (ours == "lm_head.weight" and m.tie_embeddings)}
    if m.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    for i in range(m.num_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in _LAYER.items():
            out[f"block.{i}.{ours}"] = tensors[prefix + theirs]
        for ours, theirs in _FUSED.items():
            blocks = FUSED_BLOCKS[ours.split(".")[-2]]
            out[f"block.{i}.{ours}"] = torch.cat([tensors[prefix + theirs.format(b)]
                                                  for b in blocks], dim=0)
    return out


def hf_config(cfg: Config) -> dict:
    m = cfg.model
    return {"architectures": ["OuroForCausalLM"], "model_type": "ouro",
            "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.kv_channels, "intermediate_size": m.ffn_hidden_size,
            "vocab_size": m.vocab_size, "total_ut_steps": m.loops, "early_exit_threshold": 1.0,
            "max_position_embeddings": m.max_seq_len, "rope_theta": m.rope_theta,
            "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
            "hidden_act": "silu", "torch_dtype": "float32", "use_cache": False,
            "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                         "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}}


def model_config(hf: dict) -> list[Override]:
    """Ouro's config.json as our `model.*` overrides."""
    try:
        pairs = {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
                 "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
                 "num_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
                 "head_dim": hf.get("head_dim") or 0, "ffn_hidden_size": hf["intermediate_size"],
                 "loops": hf.get("total_ut_steps", 4),
                 "max_seq_len": hf.get("max_position_embeddings", 4096),
                 "rope_theta": hf.get("rope_theta", 10000.0), "norm_eps": hf.get("rms_norm_eps", 1e-6),
                 "tie_embeddings": hf.get("tie_word_embeddings", False)}
    except KeyError as e:
        raise ConfigError(f"config.json: missing field {e.args[0]!r}") from None
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) maps")
    return [(f"model.{k}", v) for k, v in pairs.items()] + [("model.sandwich_norm", True)]


FORMAT = ReleaseFormat(to_hf, hf_config, from_hf, model_config, lambda hf: True, MODELING_FILES)
