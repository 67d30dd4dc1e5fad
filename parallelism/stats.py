"""Named statistics as every rank sees them, in one collective.

The values live on the last pipeline stage (other stages pass None); TP ranks hold copies, so
only TP rank 0 of the last stage contributes, and one all-reduce over the whole job sums the
data-parallel replicas. `mean` divides by their count (logging averages); sums stay sums
(validation: CE summed over tokens, and the token count).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from parallelism.topology import Topology


def reduce_named(named: dict[str, Tensor] | None, shapes: dict[str, tuple[int, ...]],
                 topo: Topology, mean: bool) -> dict[str, Tensor]:
    """`named` (key -> tensor of `shapes[key]`) reduced over replicas, on every rank."""
    sizes = [int(torch.Size(shape).numel()) for shape in shapes.values()]
    contributes = named is not None and topo.tp_rank == 0
    if contributes:
        flat = torch.cat([named[k].detach().reshape(-1).to(topo.device, torch.float64)
                          for k in shapes])
    else:
        flat = torch.zeros(sum(sizes), dtype=torch.float64, device=topo.device)
    if topo.world > 1:
        dist.all_reduce(flat)
    if mean:
        flat /= topo.dp
    return {k: v.view(shape) for (k, shape), v in zip(shapes.items(), flat.split(sizes),
                                                      strict=True)}
