"""Metrics by name, each with how it reduces across ranks, reduced in one collective.

The trainer, validation and the pipeline `record` values under the names every output uses
("train/loss", "loop/ce_step" per loop step, "val/...": see the callbacks); `reduce` turns
them into what every rank logs with one all-gather:

  mean  over the ranks that hold the value -- the last pipeline stage's TP rank 0 of each
        data-parallel replica (TP ranks hold copies; other stages record None)
  sum   the same ranks' values added (validation's CE x tokens, token and skip counts)
  max   over every rank that holds it (peak memory, and values every rank holds alike)
  min   the same, the least (free device memory)

A per-loop-step vector is recorded once (`steps=True`) and logged as name1 .. nameR (loop
steps count from 1 in names, from 0 in code).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from parallelism.topology import Topology

REDUCTIONS = ("mean", "sum", "max", "min")


@dataclass
class _Entry:
    value: Tensor | None  # None: this rank does not hold it
    how: str
    shape: tuple[int, ...]
    steps: bool  # a per-loop-step vector, logged as name1 .. nameR


class Metrics:
    """The named values of one log interval (or one validation pass) on this rank. Every rank
    records the same names in the same order, with None where it holds no value."""

    def __init__(self):
        self._entries: dict[str, _Entry] = {}

    def record(self, name: str, value: Tensor | float | None, how: str = "mean",
               shape: tuple[int, ...] = (), steps: bool = False) -> None:
        if how not in REDUCTIONS:
            raise ValueError(f"metric {name}: reduction {how!r} is not one of {REDUCTIONS}")
        if value is not None:
            value = torch.as_tensor(value).detach().double().reshape(shape)
        self._entries[name] = _Entry(value, how, shape, steps)

    def reduce(self, topo: Topology) -> dict[str, Tensor]:
        """Every recorded name -> its reduced value (a tensor of its shape), on every rank."""
        mine = self.local(topo).to(topo.device)
        if topo.world == 1:
            return self.combine(mine[None].cpu())
        parts = [torch.empty_like(mine) for _ in range(topo.world)]
        dist.all_gather(parts, mine)
        return self.combine(torch.stack(parts).cpu())

    def _sizes(self) -> list[int]:
        return [int(torch.Size(e.shape).numel()) for e in self._entries.values()]

    def local(self, topo: Topology) -> Tensor:
        """What this rank contributes: every value (0 where it holds none), then per value
        whether it counts (1 / 0) -- one float64 vector, the same length on every rank."""
        values, counts = [], []
        for e, n in zip(self._entries.values(), self._sizes(), strict=True):
            here = e.value is not None and (e.how in ("max", "min") or topo.tp_rank == 0)
            values.append(e.value.reshape(-1) if here else torch.zeros(n, dtype=torch.float64))
            counts.append(torch.full((n,), float(here), dtype=torch.float64))
        return torch.cat(values + counts)

    def combine(self, every: Tensor) -> dict[str, Tensor]:
        """The reduced values from every rank's `local` vector (rows of `every`)."""
        sizes = self._sizes()
        total = sum(sizes)
        rows = zip(self._entries.items(), every[:, :total].split(sizes, 1),
                   (every[:, total:] > 0).split(sizes, 1), strict=True)
        out = {}
        for (name, e), v, counts in rows:
            if e.how == "max":
                r = v.masked_fill(~counts, float("-inf")).max(0).values
            elif e.how == "min":
                r = v.masked_fill(~counts, float("inf")).min(0).values
            else:
                r = (v * counts).sum(0)
                if e.how == "mean":
                    r = r / counts.sum(0).clamp_min(1)
            out[name] = r.view(e.shape)
        return out

    def named(self, reduced: dict[str, Tensor]) -> dict[str, float]:
        """`reduce`'s result as the flat names the outputs log (per-step vectors expanded)."""
        out = {}
        for name, value in reduced.items():
            if self._entries[name].steps:
                out |= {f"{name}{t + 1}": v for t, v in enumerate(value.tolist())}
            else:
                out[name] = value.item()
        return out
