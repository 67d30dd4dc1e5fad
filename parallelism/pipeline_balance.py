"""Loop-aware pipeline balancing: which contiguous slice of the shared block each stage owns.

Every block layer runs R times per microbatch, and so does the last stage's readout (LM head,
exit gate, coda) -- once per lap. A split that only counts layers therefore overloads the last
stage by R x (head + gate + coda). The cost model charges each stage its forward FLOPs per token:
  stage k: sum over its layers of R (matmuls + attention (+ injection)) [+ prelude on stage 0]
           [+ R (coda + gate) + the LM heads the objective reads out, on the last stage]
`auto` picks the contiguous split minimising the most expensive stage (exact, by dynamic
programming); an explicit `parallel.pipeline_split` is checked and reported the same way.
"""

from __future__ import annotations

from functools import cache

from pretrain.config import Config
from pretrain.model.flops import (
    attention_flops,
    block_layer_flops,
    head_flops,
    layer_matmul_flops,
    readouts,
)


def _extras(cfg, seq_len: int, stages: int) -> list[int]:
    m = cfg.model
    unshared = layer_matmul_flops(m) + attention_flops(m, seq_len)
    extra = [0] * stages
    extra[0] += m.prelude_layers * unshared
    extra[-1] += m.loops * (m.coda_layers * unshared + 2 * m.hidden_size) + readouts(cfg) * head_flops(m)
    return extra


def stage_costs(cfg: Config, split: list[int]) -> list[int]:
    """Predicted forward FLOPs per token of each stage for `split` (layers per stage)."""
    per_layer = block_layer_flops(cfg.model, cfg.train.seq_len, cfg.model.loops)
    extra = _extras(cfg, cfg.train.seq_len, len(split))
    return [n * per_layer + e for n, e in zip(split, extra, strict=True)]


def auto_split(cfg: Config, stages: int) -> list[int]:
    n = cfg.model.num_layers
    per_layer = block_layer_flops(cfg.model, cfg.train.seq_len, cfg.model.loops)
    extra = _extras(cfg, cfg.train.seq_len, stages)

    @cache
    def best(stage: int, first_layer: int) -> tuple[int, tuple[int, ...]]:
        """(max cost, split) for stages stage.. over layers first_layer..n-1."""
        left = n - first_layer
        if stage == stages - 1:
            return left * per_layer + extra[stage], (left,)
        options = []
        for take in range(1, left - (stages - stage - 1) + 1):
            rest, split = best(stage + 1, first_layer + take)
            options.append((max(take * per_layer + extra[stage], rest), (take, *split)))
        return min(options)

    return list(best(0, 0)[1])


def resolve_split(cfg: Config) -> list[int]:
    p = cfg.parallel
    return list(p.pipeline_split) if p.pipeline_split else auto_split(cfg, p.pipeline)


def describe(cfg: Config, split: list[int]) -> str:
    costs = stage_costs(cfg, split)
    top = max(costs)
    return "; ".join(f"stage {k}: {n} layers, {c / 1e6:.1f} MFLOP/token ({c / top:.0%})"
                     for k, (n, c) in enumerate(zip(split, costs, strict=True)))
