"""Gradient statistics after backward, kept apart from the trainer's step logic.

- sequence-parallel replicated weights: summed over TP by gradient hooks (tensor_parallel.py);
- data parallelism: gradients averaged over the DP group during backward (grad_overlap.py);
- the global gradient norm counts every parameter once: TP-sharded parameters (those with a
  `tp_split`) on every TP rank, replicated ones on TP rank 0 only, summed over the model-parallel
  (TP x PP) group, since each pipeline stage holds its own parameters (a tied embedding's copy
  on the last stage is counted on the first only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallelism.topology import Topology


def global_grad_norm(params: list[nn.Parameter], topo: Topology) -> Tensor:
    """The gradient norm of the whole model; pipeline stages hold distinct parameters but for
    the last stage's copy of a tied embedding (DeepSpeed's `ds_pipe_replicated` mark), left out."""
    params = [p for p in params if not getattr(p, "ds_pipe_replicated", False)]
    grads = [p.grad for p in params if p.grad is not None]
    if topo.tp == 1 and topo.pp == 1:
        return torch.nn.utils.get_total_norm(grads)
    sharded = [p.grad for p in params if p.grad is not None and hasattr(p, "tp_split")]
    replicated = [p.grad for p in params if p.grad is not None and not hasattr(p, "tp_split")]
    sq = torch.zeros((), dtype=torch.float64, device=topo.device)
    if sharded:
        sq += torch.nn.utils.get_total_norm(sharded).double() ** 2
    if replicated and topo.tp_rank == 0:
        sq += torch.nn.utils.get_total_norm(replicated).double() ** 2
    dist.all_reduce(sq, group=topo.mp_group)
    return sq.sqrt().float()


def layer_grad_norms(model: nn.Module, topo: Topology, num_layers: int) -> list[float]:
    """The gradient norm of every shared-block layer (the FLT paper's per-layer diagnostic),
    the same on every rank: TP shards summed, replicated weights counted once, stages joined."""
    offset = getattr(model, "layer_offset", 0)
    sq = torch.zeros(num_layers, dtype=torch.float64, device=topo.device)
    for name, p in model.named_parameters():
        if p.grad is None or not name.startswith("block."):
            continue
        if hasattr(p, "tp_split") or topo.tp_rank == 0:
            sq[offset + int(name.split(".")[1])] += p.grad.double().pow(2).sum()
    if topo.tp * topo.pp > 1:
        dist.all_reduce(sq, group=topo.mp_group)
    return sq.sqrt().tolist()


def all_ranks_agree(ok: bool, topo: Topology, device: torch.device) -> bool:
    """True only if `ok` holds on every rank (so every rank skips a bad step together)."""
    if topo.world == 1:
        return ok
    flag = torch.tensor(0.0 if ok else 1.0, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0
