"""Parcae's tensor names, both ways: the state dict of their `Parcae` module
(sandyresearch/parcae, parcae_lm/models/parcae/parcae.py, modules/{blocks,mixer,mlp,
injection}.py) for a `model.loop_mode: parcae` model.

Weight names (ours -> theirs; i within each segment, j = a layer's index in prelude + block +
coda, which keys their value embeddings):

  embed.weight                       transformer.wte.weight (lm_head.weight too when untied)
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

RoPE: as Huginn's (pretrain/formats/huginn.py `pair_order`): their adjacent pairs, our halves,
one fixed permutation of each query and key head's rows.

config.json: their `save_pretrained`'s (parcae_lm/__init__.py): the fields of their
`ParcaeConfig` dataclass and `_class_name: ParcaeConfig`. Their loader reads the weights from a
pickled `model.pt`; ours are `model.safetensors` in the same names (no pickle is read or written
here: a `model.pt` of theirs converts with `safetensors.torch.save_file`, README).
What their config can say and ours cannot (GQA in the core, a recurrent width other than the
model's, another injection, norm, MLP or init) is refused naming the field.
"""

from __future__ import annotations

import math
import reprlib

import torch
from torch import Tensor

from core.config_schema import Override
from pretrain.config import Config, ConfigError, ModelConfig
from pretrain.formats import ReleaseFormat, config_int
from pretrain.formats.huginn import layer_weights, pair_order
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
    if not m.tie_embeddings:  # tied: their module's lm_head is wte (one tensor, written once)
        out["lm_head.weight"] = state["lm_head.weight"]
    for segment, i, rest, value in layer_weights(state):
        prefix = f"transformer.{_SEGMENTS[segment]}.{i}."
        if rest == "attn.qkv_proj.weight":
            q, k, v = value.split(_split(m))
            out[prefix + "attn.c_q.weight"] = q[torch.argsort(_rows(m.num_heads, d))]
            out[prefix + "attn.c_k.weight"] = k[torch.argsort(_rows(m.num_kv_heads, d))]
            out[prefix + "attn.c_v.weight"] = v
        elif rest == "attn.value_embed.table.weight":
            out[f"value_embeds.{_unique_index(m, segment, i)}.weight"] = value
        else:
            out[prefix + _PLAIN[rest]] = value
    return out


def from_parcae(m: ModelConfig, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Their module's tensors -> our state dict (the inverse of `to_parcae` for the weights our
    model has; the exit gate starts at 0)."""
    family = family_class("parcae")(m)
    d = m.kv_channels
    out = {ours: tensors[theirs] for ours, theirs in _TOP.items()}
    out["lm_head.weight"] = tensors["transformer.wte.weight" if m.tie_embeddings
                                    else "lm_head.weight"]
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


# their config fields whose value our parcae family fixes
_FIXED = {"injection_type": "diagonal", "state_init": "like-init", "prelude_norm": True,
          "block_class_name": "TransformerPreNormBlock", "norm_class_name": "RMSNorm",
          "mlp_class_name": "BaseMLP", "nonlin_name": "ReLU2", "bias": False, "qk_bias": False,
          "init_strategy": "scaled-zero", "mup_model_scaling_factor": 1, "clip_qkv": None}
FP32_EPS = float(torch.finfo(torch.float32).eps)  # F.rms_norm's epsilon on fp32 (their QK-norm)


def parcae_config(cfg: Config) -> dict:
    """Their config.json for our parcae-mode model."""
    m, r = cfg.model, cfg.recurrence
    if m.num_kv_heads != m.num_heads:
        raise ConfigError(f"model.num_kv_heads: {m.num_kv_heads}: Parcae's recurrent block has "
                          f"one KV head per query head ({m.num_heads})")
    return {"_class_name": "ParcaeConfig", "model_class_name": "Parcae",
            "block_size": m.max_seq_len, "n_embd": m.hidden_size,
            "intermediate_size": m.ffn_hidden_size, "num_attention_heads": m.num_heads,
            "num_key_value_heads": m.num_kv_heads, "vocab_size": m.vocab_size,
            "padding_multiple": 1, "padded_vocab_size": m.vocab_size,
            "rope_settings": {"use_rope": True, "rope_condense_ratio": 1,
                              "rope_base": m.rope_theta},
            "norm_eps": m.norm_eps, "qk_norm": m.qk_norm, "init_orthogonal": True,
            "logit_softcap": m.logit_softcap or None, "tie_embeddings": m.tie_embeddings,
            "recurrent_embedding_dimension": m.hidden_size,
            "recurrent_intermediation_embedding_dimension": m.ffn_hidden_size,
            "recurrent_num_attention_heads": m.num_heads,
            "n_layers_in_prelude": m.prelude_layers, "n_layers_in_recurrent_block": m.num_layers,
            "n_layers_in_coda": m.coda_layers, "mean_recurrence": m.loops,
            "mean_backprop_depth": r.backprop or m.loops,
            "sampling_scheme": "poisson-truncated-full" if r.sampler == "poisson" else "fixed",
            "recurrent_iteration_method": "per-sequence" if r.per_sequence else "per-batch",
            **_FIXED}


def model_overrides(hf: dict) -> list[Override]:
    """Their config.json as our `model.*` / `objective.*` / `recurrence.*` overrides."""
    for name, value in _FIXED.items():
        if name in hf and hf[name] != value:
            raise ConfigError(f"config.json: {name}: {reprlib.repr(hf[name])}: the parcae family "
                              f"has {value!r} only")
    h, heads = config_int(hf, "n_embd"), config_int(hf, "num_attention_heads")
    ffn = config_int(hf, "intermediate_size")
    for name, want in (("num_key_value_heads", heads), ("recurrent_num_attention_heads", heads),
                       ("recurrent_embedding_dimension", h),
                       ("recurrent_intermediation_embedding_dimension", ffn)):
        if hf.get(name) not in (None, want):
            raise ConfigError(f"config.json: {name}: {reprlib.repr(hf[name])}: only {want} (the "
                              "recurrent block has the model's widths and heads here)")
    vocab, multiple = config_int(hf, "vocab_size"), config_int(hf, "padding_multiple", default=512)
    padded = hf.get("padded_vocab_size") or -(-vocab // max(multiple, 1)) * max(multiple, 1)
    rope = hf.get("rope_settings") or {}
    if not isinstance(rope, dict):
        raise ConfigError("config.json: rope_settings: expected an object")
    method = hf.get("recurrent_iteration_method", "per-batch")
    if method not in ("per-batch", "per-sequence"):
        raise ConfigError(f"config.json: recurrent_iteration_method: {reprlib.repr(method)}: "
                          "per-batch or per-sequence only (a depth per token is not offered)")
    softcap = hf.get("logit_softcap")
    depth = config_int(hf, "mean_backprop_depth", default=0)
    std = math.sqrt(2 / (5 * max(h, 1)))  # scaled-zero's std: the layers' and the state's
    pairs = {"loop_mode": "parcae", "vocab_size": padded, "hidden_size": h, "num_heads": heads,
             "num_kv_heads": heads, "ffn_hidden_size": ffn,
             "prelude_layers": config_int(hf, "n_layers_in_prelude"),
             "num_layers": config_int(hf, "n_layers_in_recurrent_block"),
             "coda_layers": config_int(hf, "n_layers_in_coda"), "loops": config_int(hf, "mean_recurrence"),
             "max_seq_len": config_int(hf, "block_size"), "rope_theta": rope.get("rope_base", 50000.0),
             "norm_eps": hf.get("norm_eps", 1e-5), "qk_norm": bool(hf.get("qk_norm", False)),
             "qk_norm_eps": FP32_EPS, "mlp": "relu2_half", "sandwich_norm": False,
             "tie_embeddings": bool(hf.get("tie_embeddings", False)),
             "logit_softcap": 0.0 if softcap is None else softcap, "init": "parcae",
             "init_std": std, "state_std": std}
    sampler = "poisson" if "poisson" in str(hf.get("sampling_scheme")) else "fixed"
    return [(f"model.{k}", v) for k, v in pairs.items()] + [
        ("objective.kind", "last"), ("recurrence.sampler", sampler),
        ("recurrence.per_sequence", method == "per-sequence"), ("recurrence.backprop", depth)]


FORMAT = ReleaseFormat(to_parcae, parcae_config, from_parcae, model_overrides,
                       lambda hf: hf.get("_class_name") == "ParcaeConfig")
