"""Tensor and sequence parallelism with megatron-core, applied by construction.

`parallelize_tensor(model, topo)` takes a full looped model (core/model_interface.py),
initialised from the seed exactly as on one process, and swaps its layers for megatron-core's,
each holding this rank's shard of the full weights; a TP=k model from seed s therefore holds
exactly the shards of the TP=1 model from seed s. The model code itself never learns about process groups.

  qkv_proj, gate_up_proj  -> ColumnParallelLinear (fused blocks split per block: each rank holds
                             its heads' q, k, v and its share of gate and up); up_proj (relu^2)
                             likewise
  o_proj, down_proj       -> RowParallelLinear
  embed                   -> VocabParallelEmbedding, lm_head -> ColumnParallelLinear (vocab),
                             and every loop step's CE is megatron's vocab_parallel_cross_entropy
  qk_bias                 -> this rank's heads' share, like the q and k rows
  value embeddings        -> this rank's KV heads' table columns and gate rows (under sequence
                             parallelism the gate's 32 input channels are all-gathered along S)
  gate, norms, the loop   -> replicated: with TP alone every rank computes the same values
  family's modules

With sequence parallelism the residual stream between TP regions is sharded along the sequence
(megatron's all-gather / reduce-scatter replace the all-reduces); the exit gate's logits are
all-gathered so every rank holds all of them, and the replicated norm and gate weights, which
now see only a slice of the sequence, get their gradients summed over the TP group by a
gradient hook (the loop family's modules too, and the model learns which slice it holds:
`seq_shard`).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.model_interface import IGNORE_INDEX, LoopedModel
from core.weight_layout import Split, split_for
from parallelism.topology import Topology

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
    from megatron.core import tensor_parallel as mtp
    from megatron.core.model_parallel_config import ModelParallelConfig


class _Column(mtp.ColumnParallelLinear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]

    def rows(self, x: Tensor, start: int, stop: int | None) -> Tensor:
        """x times rows start:stop of this rank's shard, with the column layer's collectives
        (model/layers.py `FusedLinear.rows`: FLT's queries and keys from different inputs)."""
        if not (self.allreduce_dgrad or self.sequence_parallel):
            x = mtp.copy_to_tensor_model_parallel_region(x, group=self.tp_group)
        return self._forward_impl(
            input=x, weight=self.weight[start:stop], bias=None, gradient_accumulation_fusion=False,
            allreduce_dgrad=self.allreduce_dgrad, sequence_parallel=self.sequence_parallel,
            grad_output_buffer=None, wgrad_deferral_limit=None, tp_group=self.tp_group)


class _Row(mtp.RowParallelLinear):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


class _TiedHead(mtp.ColumnParallelLinear):
    """Vocab-parallel LM head reusing the (vocab-parallel) embedding's weight shard."""

    def __init__(self, embed: nn.Module, *args, **kwargs):
        super().__init__(*args, skip_weight_param_allocation=True, **kwargs)
        object.__setattr__(self, "_embed", embed)  # not a submodule: no duplicate parameter

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x, weight=self._embed.weight)[0]


class _Embedding(mtp.VocabParallelEmbedding):
    """Takes sequence-first ids [S, B] like nn.Embedding in the model; megatron's reduce-scatter
    path expects [B, S] and transposes itself."""

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids.t() if self.reduce_scatter_embeddings else ids)


class _GatheredGate(nn.Linear):
    """The replicated exit gate on a sequence shard, its logits all-gathered along S."""

    def forward(self, x: Tensor) -> Tensor:
        return mtp.gather_from_sequence_parallel_region(super().forward(x),
                                                        tensor_parallel_output_grad=False)


def vocab_parallel_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token CE from this rank's vocab shard of logits [S, B, V/tp]; 0 where ignored.
    (megatron's kernel normalises the logits in place: they are consumed.)"""
    keep = labels != IGNORE_INDEX
    logits = logits.float() if logits.element_size() < 4 else logits
    return mtp.vocab_parallel_cross_entropy(logits, labels.clamp_min(0).contiguous()) * keep


def _load(layer: nn.Module, full: Tensor, split: Split, topo: Topology) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(split.shard(full.detach(), topo.tp_rank, topo.tp))
    _mark(layer.weight, split)
    return layer


def _mark(p: nn.Parameter, split: Split) -> None:
    p.tp_split = split
    # the attributes megatron (and DeepSpeed's gradient norm) read to tell sharded weights
    mtp.set_tensor_model_parallel_attributes(p, True, split.dim, 1)


def _gathered_gate_input(ve: nn.Module):
    """A value embedding's gate input on the whole sequence (its channels on every rank's
    slice all-gathered; backward reduce-scatters: each rank's heads add their share)."""
    def gate_input(x: Tensor) -> Tensor:
        return mtp.gather_from_sequence_parallel_region(x[..., :ve.GATE_CHANNELS])
    return gate_input


def _shard_value_embedding(cfg, ve: nn.Module, topo: Topology, sequence_parallel: bool) -> None:
    for name in ("table", "gate"):
        split = split_for(cfg, f"block.0.attn.value_embed.{name}.weight")
        module = getattr(ve, name)
        module.weight = nn.Parameter(split.shard(module.weight.detach(), topo.tp_rank, topo.tp))
        _mark(module.weight, split)
    ve.n_kv //= topo.tp
    if sequence_parallel:
        ve.gate_input = _gathered_gate_input(ve)


def _sum_over_tp(group):
    def hook(grad: Tensor) -> Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad
    return hook


def parallelize_tensor(model: LoopedModel, topo: Topology, sequence_parallel: bool = False) -> None:
    cfg = model.cfg
    mcfg = ModelParallelConfig(tensor_model_parallel_size=topo.tp,
                               sequence_parallel=sequence_parallel, use_cpu_initialization=True,
                               perform_initialization=False, gradient_accumulation_fusion=False)
    kw = {"config": mcfg, "init_method": nn.init.zeros_, "bias": False}
    h, f = cfg.hidden_size, cfg.ffn_hidden_size
    q = cfg.num_heads * cfg.kv_channels
    up = "mlp.gate_up_proj" if cfg.mlp == "swiglu" else "mlp.up_proj"
    split = {k: split_for(cfg, f"block.0.{k}.weight") for k in
             ("attn.qkv_proj", "attn.o_proj", up, "mlp.down_proj")}
    qkv = sum(split["attn.qkv_proj"].parts)
    for layer in (*model.prelude, *model.block, *model.coda):
        a, m = layer.attn, layer.mlp
        a.qkv_proj = _load(_Column(h, qkv, gather_output=False, **kw), a.qkv_proj.weight,
                           split["attn.qkv_proj"], topo)
        a.o_proj = _load(_Row(q, h, input_is_parallel=True, skip_bias_add=False, **kw),
                         a.o_proj.weight, split["attn.o_proj"], topo)
        a.n_heads, a.n_kv = a.n_heads // topo.tp, a.n_kv // topo.tp
        if a.value_embed is not None:
            _shard_value_embedding(cfg, a.value_embed, topo, sequence_parallel)
        if a.qk_bias is not None:
            bias = split_for(cfg, "block.0.attn.qk_bias")
            a.qk_bias = nn.Parameter(bias.shard(a.qk_bias.detach(), topo.tp_rank, topo.tp))
            _mark(a.qk_bias, bias)
        name = up.split(".")[1]
        width = sum(split[up].parts)
        setattr(m, name, _load(_Column(h, width, gather_output=False, **kw),
                               getattr(m, name).weight, split[up], topo))
        m.down_proj = _load(_Row(f, h, input_is_parallel=True, skip_bias_add=False, **kw),
                            m.down_proj.weight, split["mlp.down_proj"], topo)
    vocab = split_for(cfg, "embed.weight")
    embed = _Embedding(cfg.vocab_size, h, init_method=nn.init.zeros_,
                       reduce_scatter_embeddings=sequence_parallel, config=mcfg)
    full_head = model.lm_head.weight
    model.embed = _load(embed, model.embed.weight, vocab, topo)
    if cfg.tie_embeddings:
        model.lm_head = _TiedHead(model.embed, h, cfg.vocab_size, gather_output=False, **kw)
    else:
        model.lm_head = _load(_Column(h, cfg.vocab_size, gather_output=False, **kw), full_head,
                              vocab, topo)
    if sequence_parallel:
        gate = _GatheredGate(h, 1)
        gate.load_state_dict(model.gate.state_dict())
        model.gate = gate
        model.seq_shard = (topo.tp_rank, topo.tp)
        replicated = ("gate.", *(f"{name}." for name in (*model.loop_modules,
                                                            *model.embedding_modules,
                                                            *model.readout_modules)))
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.startswith(replicated):
                p.sequence_parallel = True
                # summed over TP as autograd produces it, before it reaches .grad: every
                # backward pattern (pipeline pieces) and optimizer (ZeRO hooks) sees the sum
                p.register_hook(_sum_over_tp(topo.tp_group))


def gather_full(tensor: Tensor, split: Split | None, topo: Topology) -> Tensor:
    """The full (TP=1) tensor from every TP rank's shard; replicated tensors as they are."""
    if split is None or topo.tp == 1:
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(topo.tp)]
    dist.all_gather(shards, tensor.contiguous(), group=topo.tp_group)
    return split.unshard(shards)


def full_state_dict(model: nn.Module, topo: Topology) -> dict[str, Tensor]:
    """The TP=1 state dict (same names) gathered from the shards, on every TP rank."""
    params = dict(model.named_parameters())
    out = {}
    for name, value in model.state_dict().items():
        out[name] = gather_full(value, getattr(params.get(name), "tp_split", None), topo)
    if getattr(model.cfg, "tie_embeddings", False):
        out["lm_head.weight"] = out["embed.weight"]
    return out
