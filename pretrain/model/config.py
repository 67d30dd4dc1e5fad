"""The model and objective sections of the config, validated beside the model they describe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_schema import require


@dataclass
class ModelConfig:
    vocab_size: int = 257
    hidden_size: int = 64
    num_layers: int = 2  # layers of the shared looped block
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_heads
    ffn_hidden_size: int = 256
    # R: how many times the shared block is applied (evaluation, decoding, export; the mean
    # a sampled training depth draws around: model/recurrence.py)
    loops: int = 4
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_reverse: bool = False  # rotate by -angle: nanochat's (the FLT code's) RoPE sense
    norm_eps: float = 1e-6
    sandwich_norm: bool = True  # Ouro: RMSNorm before and after each sublayer
    # where the second norm of a sandwich sits: on the sublayer's output before the residual
    # add (Ouro: x + N2(attn(N1 x))), or on the sum (Huginn's SandwichBlock: N2(x + attn(N1 x)))
    sandwich_style: Literal["ouro", "huginn"] = "ouro"
    tie_embeddings: bool = False
    prelude_layers: int = 0  # unshared layers run once before the loop (Huginn-style)
    coda_layers: int = 0  # unshared layers run on every loop's output before the head
    # the loop family: how one loop hands over to the next (model/families/: ouro, the FLT
    # paper's lt, lt_i, lt_ia, flt, flt_res, huginn, or any family registered by name)
    loop_mode: str = "ouro"
    # False (an ablation, not a published model): ouro mode carries the raw stream x_t into the
    # next loop and norms only the readout
    norm_between_loops: bool = True
    qk_bias: bool = False  # Huginn: a learned bias on every query and key head, before RoPE
    embed_scale: float = 1.0  # e = Embed(ids) * embed_scale (Huginn: sqrt(hidden_size))
    # huginn: x_0 ~ truncated normal(0, state_std, cut at +-3 state_std) * embed_scale
    # (Huginn: state_std = sqrt(2 / (5 hidden_size))); 0: x_0 = 0
    state_std: float = 0.0
    qk_norm: bool = False  # FLT recipe: weightless RMSNorm of queries and keys after RoPE
    qk_norm_eps: float = 0.0  # its epsilon (0: model.norm_eps; Parcae: fp32's, F.rms_norm's)
    norm_weights: bool = True  # False: RMSNorm without a learned scale (FLT recipe)
    # relu2: down(relu(up(x))^2) (FLT recipe); relu2_half: down(relu(up(x))^2 / 2) (Parcae's)
    mlp: Literal["swiglu", "relu2", "relu2_half"] = "swiglu"
    logit_softcap: float = 0.0  # > 0: logits = c tanh(logits / c) (FLT recipe: 15)
    # flt: the FLT authors' initialisation; huginn: Huginn-0125's; parcae: Parcae's scaled-zero
    # orthogonal one (model/looped.py)
    init: Literal["normal", "flt", "huginn", "parcae"] = "normal"
    dropout: float = 0.0
    init_std: float = 0.02
    # lambda > 0: every residual branch of the shared block adds epsilon f(x), epsilon = lambda /
    # (loops sqrt(num_layers)) (arXiv 2606.18524: the best lr then depends on num_layers only,
    # not on R); 0: off (every released model)
    residual_scale: float = 0.0

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class ObjectiveConfig:
    # elbo / adaptive_gate: Ouro stage 1 / stage 2; last / all / few: the FLT paper's CE on the
    # last loop, the mean over every loop, or over loops floor(2R/3)..R (1-based: the last third)
    kind: Literal["elbo", "adaptive_gate", "last", "all", "few"] = "elbo"
    gate_target: Literal["paper", "lookahead"] = "paper"  # stage 2: Ouro Eq. 5-6, or ours
    beta: float = 0.1  # entropy weight of the ELBO (uniform prior over exit steps)
    gate_k: float = 50.0  # adaptive gate: slope of the "another loop still helps" target
    gate_gamma: float = 0.005  # adaptive gate: CE improvement that counts as helping


def validate_model(m: ModelConfig) -> None:
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "ffn_hidden_size", "max_seq_len", "loops"):
        require(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    require(m.head_dim >= 0, "model.head_dim", f"must be >= 0, got {m.head_dim}")
    if m.head_dim == 0:
        require(m.hidden_size % m.num_heads == 0, "model.num_heads",
                f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
    require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
            f"num_heads {m.num_heads} is not divisible by num_kv_heads {m.num_kv_heads}")
    require(m.kv_channels % 2 == 0, "model.head_dim",
            f"RoPE needs an even head dimension, got {m.kv_channels}")
    require(m.prelude_layers >= 0, "model.prelude_layers", "must be >= 0")
    require(m.coda_layers >= 0, "model.coda_layers", "must be >= 0")
    require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    require(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    require(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    require(m.qk_norm_eps >= 0, "model.qk_norm_eps", f"must be >= 0, got {m.qk_norm_eps}")
    require(m.init_std > 0, "model.init_std", "must be > 0")
    require(m.sandwich_style == "ouro" or m.sandwich_norm, "model.sandwich_style",
            "huginn places the second norm of a sandwich: it needs model.sandwich_norm: true")
    require(m.embed_scale > 0, "model.embed_scale", f"must be > 0, got {m.embed_scale}")
    require(m.state_std >= 0, "model.state_std", f"must be >= 0, got {m.state_std}")
    require(m.residual_scale >= 0, "model.residual_scale", f"must be >= 0, got {m.residual_scale}")
    require(m.logit_softcap >= 0, "model.logit_softcap", f"must be >= 0, got {m.logit_softcap}")


def validate_objective(ob: ObjectiveConfig, m: ModelConfig, per_sequence: bool) -> None:
    """`per_sequence`: whether each sequence draws its own depth (recurrence.per_sequence)."""
    require(ob.beta >= 0, "objective.beta", f"must be >= 0, got {ob.beta}")
    require(not per_sequence or ob.kind == "last", "objective.kind",
            f"{ob.kind}: with recurrence.per_sequence only the last step is every sequence's "
            "own (use last)")
    require(ob.gate_k > 0, "objective.gate_k", "must be > 0")
    if ob.kind == "adaptive_gate":
        require(m.loops >= 2, "objective.kind", "adaptive_gate needs model.loops >= 2")
