"""Parameter and FLOP accounting: `pretrain params`, MFU, the planner and the pipeline balance.

Parameters are counted on a meta-device instance of the real model, so the count cannot drift
from the code and a 2.6B config costs no memory. FLOPs are analytic, per token, forward plus
backward (= 3x forward): every matmul counts 2 FLOPs per multiply-add; attention scores and the
weighted sum count 2 * 2 * seq_len * (heads * head_dim) per layer per loop (full sequence, the
PaLM/Chinchilla convention); the LM head and exit gate run on every loop step read out; the
prelude runs once, the coda once per readout, a loop family's own modules (model/families/:
huginn's adapter, 2H -> H; parcae's injection, e B^T) once per loop and its readout modules
(parcae's C) once per readout; a value embedding's gate (a 32 -> KV heads matmul) wherever
its layer runs. With
truncated backprop only the last k loop steps have a backward: a step without a graph costs
its forward alone; a run with R drawn per step counts E[R] and E[k] (model/recurrence.py).
Every loop mode costs the same: FLT's queries from h_{t-1} use the
query rows of the same projection (model/layers.py `FusedLinear.rows`), no extra matmul.
Functions of `cfg` without a type take the run config (its model, objective, train and
parallel sections; pretrain/config.py, a floor above this one).
"""

from __future__ import annotations

import torch

from parallelism.pipeline_balance import StageCosts, auto_split
from pretrain.model.config import ModelConfig
from pretrain.model.families import family_class
from pretrain.model.layers import ValueEmbedding
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import readout_steps, trains_gate
from pretrain.model.recurrence import Recurrence, step_samples


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = LoopedLM(cfg)
    total = sum(p.numel() for p in model.parameters())  # tied weights are yielded once
    embedding = model.embed.weight.numel()
    if not cfg.tie_embeddings:
        embedding += model.lm_head.weight.numel()
    block = sum(p.numel() for p in model.block.parameters())
    # run every loop step: the block and the family's modules (the iso-depth law's N_rec)
    recurrent = block + sum(p.numel() for name in model.loop_modules
                            for p in getattr(model, name).parameters())
    return {"total": total, "non_embedding": total - embedding, "embedding": embedding,
            "looped_block": block, "recurrent": recurrent,
            "once": total - embedding - recurrent}


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


def loop_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of the loop family's own modules, once per loop step."""
    return family_class(cfg.loop_mode)(cfg).loop_flops()


def readout_family_flops(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of the family's readout modules (Parcae's C), per readout."""
    return family_class(cfg.loop_mode)(cfg).readout_flops()


def value_embedding_gates(cfg: ModelConfig) -> tuple[int, int, int]:
    """Forward FLOPs per token of the value-embedding gates in the prelude, the block and the
    coda (model/layers.py `ValueEmbedding`: where the loop family puts them)."""
    family = family_class(cfg.loop_mode)(cfg)
    gate = 2 * ValueEmbedding.GATE_CHANNELS * cfg.num_kv_heads
    return tuple(gate * family.value_embeddings(segment, range(n))
                 for segment, n in (("prelude", cfg.prelude_layers), ("block", cfg.num_layers),
                                    ("coda", cfg.coda_layers)))


def flops_per_token(cfg: ModelConfig, seq_len: int, loops: float | None = None,
                    read_count: float | None = None, train_gate: bool = True,
                    backprop: float | None = None) -> float:
    """Training FLOPs (forward + backward) per token at context `seq_len`; `read_count` loop
    steps run the readout -- coda, LM head, gate -- (default all), the gate has a backward
    only when trained (the FLT objectives read out fewer steps and leave the gate alone), and
    `backprop` of the loop steps -- the last ones, where every objective's readouts lie --
    have a backward (default all). R and k may be expectations."""
    r = loops or cfg.loops
    k = r if backprop is None else backprop
    reads = r if read_count is None else read_count
    reads_bwd = min(reads, k)
    unshared = layer_matmul_flops(cfg) + attention_flops(cfg, seq_len)
    ve_prelude, ve_block, ve_coda = value_embedding_gates(cfg)
    prelude = cfg.prelude_layers * unshared + ve_prelude
    step = cfg.num_layers * (layer_matmul_flops(cfg) + attention_flops(cfg, seq_len)) \
        + loop_flops(cfg) + ve_block
    readout = cfg.coda_layers * unshared + head_flops(cfg) + readout_family_flops(cfg) + ve_coda
    forward = prelude + r * step + reads * readout
    backward = 2 * (prelude + k * step + reads_bwd * readout)
    gate = 2 * cfg.hidden_size * (reads + 2 * reads_bwd * train_gate)
    return forward + backward + gate


def read_count(cfg, step: int | None = None) -> float:
    """Loop steps whose LM head a training step runs (model/objective.py `readout_steps`; at
    E[R] when R is drawn per step), at `step`'s growth phase (the last without one)."""
    mean_r, _ = Recurrence.of(cfg).expected(step_samples(cfg), step)
    if trains_gate(cfg.objective.kind):
        return mean_r
    return len(readout_steps(cfg.objective.kind, max(round(mean_r), 1)))


def run_flops_per_token(cfg, step: int | None = None) -> float:
    """Training FLOPs per token of a run: its context, the readouts its objective needs and
    the expected loop steps with and without a backward (at `step`'s growth phase: the last
    without one)."""
    mean_r, mean_k = Recurrence.of(cfg).expected(step_samples(cfg), step)
    return flops_per_token(cfg.model, cfg.train.seq_len, loops=mean_r,
                           read_count=read_count(cfg, step),
                           train_gate=trains_gate(cfg.objective.kind), backprop=mean_k)


def stage_cost_model(cfg) -> StageCosts:
    """The circular pipeline's balance (parallelism/pipeline_balance.py), forward + backward
    FLOPs per token of a step: every block layer runs E[R] laps per microbatch, E[k] of them
    with a backward, and so does the last stage's readout -- once per lap read out -- so a
    split that only counted layers would overload the last stage by R x (head + gate + coda)."""
    m, s = cfg.model, cfg.train.seq_len
    r, k = Recurrence.of(cfg).expected(step_samples(cfg))
    reads = read_count(cfg)
    laps, read_laps = r + 2 * k, reads + 2 * min(reads, k)
    unshared = layer_matmul_flops(m) + attention_flops(m, s)
    return StageCosts(per_layer=round(laps * (layer_matmul_flops(m) + attention_flops(m, s))),
                      first=round(3 * m.prelude_layers * unshared + laps * loop_flops(m)),
                      last=round(read_laps * (m.coda_layers * unshared + 2 * m.hidden_size
                                              + head_flops(m) + readout_family_flops(m))))


def pipeline_split(cfg) -> list[int]:
    """Block layers per pipeline stage: `parallel.pipeline_split`, or the balanced split."""
    p = cfg.parallel
    return list(p.pipeline_split) or auto_split(stage_cost_model(cfg), cfg.model.num_layers,
                                                p.pipeline)
