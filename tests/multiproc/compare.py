"""How the multi-process checks compare a parallel tensor with the single-process one."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from parallelism.topology import shutdown

# max |a - b| <= rtol max |b| + atol: relative to the tensor's scale, plus a floor for sums
# that cancel (a bias gradient summed over every token differs by ~1e-8 between summation
# orders in fp32, however small the sum itself is)
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def close_to(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= GRAD_RTOL * b.abs().max() + GRAD_ATOL)


def finish(topo, results, out: str) -> None:
    """Rank 0 writes the results as JSON; then every rank leaves the job."""
    if topo.rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()
    shutdown(topo)
