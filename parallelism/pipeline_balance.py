"""Loop-aware pipeline balancing: which contiguous slice of the shared block each stage owns.

The cost model charges each stage its forward + backward FLOPs per token (the model side
computes it: pretrain/model/flops.py `stage_cost_model`; a lap without a graph -- truncated
backprop -- costs its forward alone, a sampled R counts its expectation):
  stage k: sum over its layers' laps (matmuls + attention) [+ prelude, the family's modules on stage 0]
           [+ the coda, gate and LM heads of the steps the objective reads, on the last stage]
`auto_split` picks the contiguous split minimising the most expensive stage (exact, by dynamic
programming); an explicit `parallel.pipeline_split` is checked and reported the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache


@dataclass(frozen=True)
class StageCosts:
    """Forward + backward FLOPs per token (pretrain/model/flops.py `stage_cost_model`): one
    block layer with all its laps, and what stage 0 (the prelude, the loop family's modules) and the
    last stage (coda, gate, the LM heads read out) add."""

    per_layer: int
    first: int
    last: int

    def of(self, split: list[int]) -> list[int]:
        """Each stage's cost under `split` (layers per stage)."""
        costs = [n * self.per_layer for n in split]
        costs[0] += self.first
        costs[-1] += self.last
        return costs


def auto_split(costs: StageCosts, layers: int, stages: int) -> list[int]:
    """The contiguous split of `layers` over `stages` minimising the most expensive stage."""

    def extra(stage: int) -> int:
        return (costs.first if stage == 0 else 0) + (costs.last if stage == stages - 1 else 0)

    @cache
    def best(stage: int, first_layer: int) -> tuple[int, tuple[int, ...]]:
        """(max cost, split) for stages stage.. over layers first_layer..layers-1."""
        left = layers - first_layer
        if stage == stages - 1:
            return left * costs.per_layer + extra(stage), (left,)
        options = []
        for take in range(1, left - (stages - stage - 1) + 1):
            rest, split = best(stage + 1, first_layer + take)
            options.append((max(take * costs.per_layer + extra(stage), rest), (take, *split)))
        return min(options)

    return list(best(0, 0)[1])


def describe(costs: StageCosts, split: list[int]) -> str:
    each = costs.of(split)
    top = max(each)
    return "; ".join(f"stage {k}: {n} layers, {c / 1e6:.1f} MFLOP/token ({c / top:.0%})"
                     for k, (n, c) in enumerate(zip(split, each, strict=True)))
