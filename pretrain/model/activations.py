"""Bytes one micro-batch keeps for backward, predicted from the shapes: the planner's memory
model, checked against an exact count (model/memory.py `SavedForBackward`) in
bench/activation_memory.py.

Counted per token in elements of the activation dtype, term by term from what this code's
operations save (fp32; a tensor shared by several operations counts once):

  weighted RMSNorm   its input, the rsqrt (1), the unscaled output (H), and the scaled output
                     when a linear layer reads it (H); weightless: input, rsqrt, output
  attention          q|k|v (q + 2kv; kept as the core's v), rotated q and k (q + kv), the
                     core's output and log-sum-exp (q + heads), the output projection's
                     contiguous input (q); QK-norm: normed q and k and their rsqrt
                     (q + kv + heads + kv_heads); queries from h (FLT): attn_norm(h), and the
                     separate q projection is not kept (- q)
  MLP                SwiGLU: gate|up (2F), silu (F), product (F); relu^2: relu (F), square (F)
  readout            the final norm, the soft-capped logits (V, with model.logit_softcap) and
                     log-softmax (V) per step read out, plus the labels; a deferred chunked
                     readout (train.loss_chunk_tokens) keeps only the per-token CE (1)

With TP t the attention/MLP terms divide by t; hidden-sized terms divide by t only under
sequence parallelism (each rank holds a slice of the stream), and megatron's
vocab-parallel CE keeps the [V/t] softmax. Recompute: `selective` drops the core's output and
log-sum-exp; a recomputed layer (`full`, the early loops of `loops`) keeps only its input.
Under bf16 autocast the residual stream and the norms stay fp32 and the rest is bf16: the
prediction uses 4 bytes for hidden-sized terms and 2 for the others (an approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.model.families import Widths, family_class
from pretrain.model.memory import MemoryPolicy


@dataclass(frozen=True)
class Shard:
    """Where the counted part of the model lives: TP degree, sequence parallelism, and the
    pipeline stage's slice (layers of the block; first: embedding; last: readout)."""

    tp: int = 1
    sp: bool = False
    layers: int | None = None  # block layers on this stage (None: all)
    offset: int = 0  # the index of its first block layer in the whole block
    first: bool = True
    last: bool = True


def _norm(h: float, r: float, weighted: bool, read_by_linear: bool) -> float:
    """A norm's saved elements per token besides its input (rsqrt r, outputs h wide)."""
    return r + (h if weighted else 0) + (h if read_by_linear else 0)


def layer_elements(m, tp: int, sp: bool, recompute_core: bool) -> tuple[float, float]:
    """(hidden-sized, other) elements one decoder layer application saves per token."""
    h = m.hidden_size / (tp if sp else 1)
    r = 1 / (tp if sp else 1)
    q, kv = m.num_heads * m.kv_channels / tp, m.num_kv_heads * m.kv_channels / tp
    heads, kv_heads = m.num_heads / tp, m.num_kv_heads / tp
    w = m.norm_weights
    hidden = h + _norm(h, r, w, True) + h + _norm(h, r, w, True)  # inputs and pre-norms
    if m.sandwich_norm:  # the post-norms' inputs (sublayer outputs) and their own terms
        hidden += 2 * (h + _norm(h, r, w, False))
    attn = (q + 2 * kv) + (q + kv) + q + (0 if recompute_core else q + heads)
    if m.qk_norm:
        attn += q + kv + heads + kv_heads
    f = m.ffn_hidden_size / tp
    mlp = 4 * f if m.mlp == "swiglu" else 2 * f
    return hidden, attn + mlp


def value_embedding_elements(m, tp: int) -> float:
    """What a value embedding (model/layers.py `ValueEmbedding`) changes in a layer's saved
    elements per token: v becomes its own tensor (attention keeps it, not the fused q|k|v
    projection's output: - q - 2 kv + kv), plus the table's rows (kv) and the gate's two
    (sigmoid and doubled) outputs."""
    q, kv, kv_heads = (m.num_heads * m.kv_channels / tp, m.num_kv_heads * m.kv_channels / tp,
                       m.num_kv_heads / tp)
    return -q - 2 * kv + kv + kv + 2 * kv_heads


def widths(m, tp: int, sp: bool, recomputed: bool) -> Widths:
    h = m.hidden_size / (tp if sp else 1)
    r = 1 / (tp if sp else 1)
    # attn_norm(h) for the queries; their projection's output is then no longer part of a
    # fused q|k|v that the core keeps (v), and rotation keeps none of it: - q
    q_norm = _norm(h, r, m.norm_weights, True) - m.num_heads * m.kv_channels / tp
    return Widths(h, r, 0.0 if recomputed else q_norm)


def readout_elements(m, tp: int, sp: bool, chunked: bool) -> tuple[float, float]:
    """(hidden-sized, other) elements per token of one read-out loop step."""
    h = m.hidden_size / (tp if sp else 1)
    r = 1 / (tp if sp else 1)
    hidden = h + _norm(h, r, m.norm_weights, True)  # the final norm and its input
    if chunked:
        return hidden, 1.0
    v = m.vocab_size / tp
    logits = v * (2 if m.logit_softcap > 0 else 1) + (3 if tp > 1 else 2)  # + labels, masks
    return hidden, logits


def saved_bytes(cfg, micro_batch: int, policy: MemoryPolicy, shard: Shard = Shard(),
                bf16: bool = False, read_count: int | None = None) -> float:
    """Bytes one micro-batch of `micro_batch` x train.seq_len tokens keeps for backward on
    this shard, over all R loops. `read_count`: how many loop steps are read out (default all)."""
    m, s = cfg.model, cfg.train.seq_len
    tokens = micro_batch * s
    loops = m.loops
    layers = m.num_layers if shard.layers is None else shard.layers
    big, small = (4, 2) if bf16 else (4, 4)
    hidden_l, other_l = layer_elements(m, shard.tp, shard.sp, policy.recompute == "selective")
    full_layer = hidden_l * big + other_l * small
    h_bytes = m.hidden_size / (shard.tp if shard.sp else 1) * big
    # the prelude's and coda's layers: recomputed (their input kept) under `full` only
    outside = h_bytes if policy.recompute == "full" else full_layer
    family = family_class(m.loop_mode)(m)
    ve = value_embedding_elements(m, shard.tp) * big
    block_ve = family.value_embeddings("block", range(shard.offset, shard.offset + layers)) * ve
    ve_outside = 0.0 if policy.recompute == "full" else ve
    total = 0.0
    for t in range(loops):
        again = policy.recomputes_layer(t, loops)
        # recomputed: the input only
        total += layers * h_bytes if again else layers * full_layer + block_ve
        if t > 0:  # what the loop family adds per step (model/families/)
            total += family.saved_per_loop(widths(m, shard.tp, shard.sp, again), layers,
                                           shard.first, shard.last) * big
    if shard.first:
        total += 2 * 4 + m.prelude_layers * outside  # the ids (int64)
        total += family.value_embeddings("prelude", range(m.prelude_layers)) * ve_outside
        total += family.saved_first(widths(m, shard.tp, shard.sp, False)) * big
        total += m.kv_channels * big / micro_batch  # rope cos/sin rows of the sequence
    if shard.last:
        hidden_r, other_r = readout_elements(m, shard.tp, shard.sp, policy.chunk_rows > 0)
        steps = loops if read_count is None else read_count
        # the final norm on every loop step, or (a family handing over x_t) on the steps read
        # out; a family whose readout reads x_t has it after the coda alone (in hidden_r)
        normed = steps if family.hands_over_raw else loops
        total += normed * hidden_r * big + steps * other_r * 4  # the loss path is fp32
        total += (7 * loops + 1) * 4  # gate, exit distribution and ELBO terms of the objective
        total += steps * m.coda_layers * outside  # the coda runs on each step read out
        total += steps * family.value_embeddings("coda", range(m.coda_layers)) * ve_outside
        if not shard.first:
            total += m.kv_channels * big / micro_batch
    return total * tokens
