"""Parameter and FLOP accounting for `pretrain params` (and, later, MFU and the planner).

Parameters are counted on a meta-device instance of the real model, so the count cannot drift
from the code and a 2.6B config costs no memory. FLOPs are analytic, per token, forward plus
backward (= 3x forward): every matmul counts 2 FLOPs per multiply-add; attention scores and the
weighted sum count 2 * 2 * seq_len * (heads * head_dim) per layer per loop (full sequence, the
PaLM/Chinchilla convention); the LM head and exit gate run on every loop step; the prelude runs
once, the coda R times. Every loop mode costs the same: FLT's queries from h_{t-1} use the
query rows of the same projection (model/layers.py `FusedLinear.rows`), no extra matmul.
Functions of `cfg` without a type take the run config (its model, objective, train and
parallel sections; pretrain/config.py, a floor above this one).
"""

from __future__ import annotations

import torch

from parallelism.pipeline_balance import StageCosts, auto_split
from pretrain.model.config import ModelConfig
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import readout_steps, trains_gate


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = LoopedLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    embedding = model.embed.weight.numel()
    if not cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    block = sum(p.numel() for p in model.block.parameters())
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding,
            "looped_block": block}


def layer_matmul_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one decoder layer's weight matmuls."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.kv_channels
    attn = h * cfg.num_heads * d * 2 + h * cfg.num_kv_heads * d * 2  # q, o and k, v
    mlp = (3 if cfg.mlp == "swiglu" else 2) * h * f  # gate, up, down / up, down
    return 2 * (attn + mlp)


def attention_flops(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of one layer's scores and weighted sum (one loop, no injection)."""
    return 2 * 2 * seq_len * cfg.num_heads * cfg.kv_channels


def head_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of one loop step's LM head."""
    return 2 * cfg.hidden_size * cfg.vocab_size


def block_layer_flops(cfg: ModelConfig, seq_len: int, loops: int) -> int:
    """Forward FLOPs per token of one shared-block layer over all `loops` applications."""
    return loops * (layer_matmul_flops(cfg) + attention_flops(cfg, seq_len))


def flops_per_token(cfg: ModelConfig, seq_len: int, loops: int | None = None,
                    read_count: int | None = None, train_gate: bool = True) -> int:
    """Training FLOPs (forward + backward) per token at context `seq_len`; `read_count` loop
    steps run the readout -- coda, LM head, gate -- (default all), and the gate has a backward
    only when trained (the FLT objectives read out fewer steps and leave the gate alone)."""
    r = loops or cfg.loops
    reads = r if read_count is None else read_count
    unshared = layer_matmul_flops(cfg) + attention_flops(cfg, seq_len)
    forward = (cfg.prelude_layers * unshared + cfg.num_layers * block_layer_flops(cfg, seq_len, r)
               + reads * (cfg.coda_layers * unshared + head_flops(cfg)))
    gate = reads * 2 * cfg.hidden_size * (3 if train_gate else 1)
    return 3 * forward + gate


def read_count(cfg) -> int:
    """Loop steps whose LM head a training step runs (model/objective.py `readout_steps`)."""
    return len(readout_steps(cfg.objective.kind, cfg.model.loops))


def run_flops_per_token(cfg) -> int:
    """Training FLOPs per token of a run: its context and the readouts its objective needs."""
    return flops_per_token(cfg.model, cfg.train.seq_len, read_count=read_count(cfg),
                           train_gate=trains_gate(cfg.objective.kind))


def stage_cost_model(cfg) -> StageCosts:
    """The circular pipeline's balance (parallelism/pipeline_balance.py): every block layer
    runs R times per microbatch, and so does the last stage's readout -- once per lap -- so a
    split that only counted layers would overload the last stage by R x (head + gate + coda)."""
    m, s = cfg.model, cfg.train.seq_len
    unshared = layer_matmul_flops(m) + attention_flops(m, s)
    return StageCosts(per_layer=block_layer_flops(m, s, m.loops),
                      first=m.prelude_layers * unshared,
                      last=m.loops * (m.coda_layers * unshared + 2 * m.hidden_size)
                      + read_count(cfg) * head_flops(m))


def pipeline_split(cfg) -> list[int]:
    """Block layers per pipeline stage: `parallel.pipeline_split`, or the balanced split."""
    p = cfg.parallel
    return list(p.pipeline_split) or auto_split(stage_cost_model(cfg), cfg.model.num_layers,
                                                p.pipeline)
