"""`pretrain plan --rehearse`: a layout's real setup code, run on a laptop before it runs on a
64-GPU allocation.

For each layout the config is validated with the layout's overrides (the one-line errors of
`pretrain train`); then, for one rank of every pipeline stage, this process joins torch's fake
process group as that rank (parallelism/topology.py `rehearsal_topology`: collectives do
nothing), builds the model on the meta device (shapes, no memory), and runs what
`pretrain train` runs: `step_engine.shape_for_layout` (megatron-core TP layers, the memory
policy, the auto-split stage slice), the pipeline stage, the ZeRO config, and the sharded
checkpoint's entries -- whose global shapes must equal the single-process model's, the promise
that lets a checkpoint load under any layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from core.config_schema import ConfigError
from parallelism.pipeline import PipelineStage
from parallelism.sharded_state import ShardedState
from parallelism.topology import Topology, end_rehearsal, rehearsal_topology
from parallelism.zero import zero_config
from pretrain.config import load_config
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import readout_steps
from pretrain.step_engine import shape_for_layout


@dataclass(frozen=True)
class Rehearsal:
    tp: int
    pp: int
    dp: int
    zero: int
    error: str = ""  # '' when every stage was set up

    @property
    def name(self) -> str:
        return f"TP {self.tp} x PP {self.pp} x DP {self.dp}, ZeRO {self.zero}"


def _global_shapes(state: ShardedState) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.state_dict().items() if k.startswith("model/")}


def _stage(cfg, rank: int) -> tuple[dict[str, tuple], list[int]]:
    """Set up rank `rank` of the layout on meta; its checkpoint entries and the split."""
    single = cfg.parallel.world_size == 1
    topo = Topology() if single else rehearsal_topology(cfg.parallel, rank)
    try:
        with torch.device("meta"):  # megatron's TP layers too: nothing is allocated
            model = LoopedLM(cfg.model)
            _, split = shape_for_layout(cfg, model, topo, log=lambda _: None)
        if topo.pp > 1:
            PipelineStage(model, topo, cfg, readout_steps(cfg.objective.kind, cfg.model.loops))
        if cfg.parallel.zero_stage:
            zero_config(cfg, pipeline=topo.pp > 1)
        return _global_shapes(ShardedState(model, topo)), split
    finally:
        if not single:
            end_rehearsal()


def rehearse(config: str, overrides: list[str], tp: int, pp: int, dp: int, zero: int,
             reference: dict[str, tuple]) -> Rehearsal:
    """One layout; `reference`: the single-process model's entry shapes (`reference_shapes`)."""
    layout = [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.data={dp}",
              f"parallel.zero_stage={zero}", f"parallel.sequence_parallel={str(tp > 1).lower()}"]
    result = Rehearsal(tp, pp, dp, zero)
    try:
        cfg = load_config(config, [*overrides, *layout])
        per = tp * dp  # megatron's rank order (tp, dp, pp): stage k starts at rank k * tp * dp
        seen: dict[str, tuple] = {}
        for stage in range(pp):
            shapes, split = _stage(cfg, stage * per)
            seen.update(shapes)
        wrong = [k for k, v in seen.items() if reference.get(k) != v]
        if wrong or seen.keys() != reference.keys():
            missing = sorted(reference.keys() - seen.keys())
            raise ConfigError(f"checkpoint entries differ from one process: "
                              f"{(wrong + missing)[:3]}")
    except (ConfigError, ValueError, RuntimeError, AssertionError) as e:
        return Rehearsal(tp, pp, dp, zero, str(e).splitlines()[0])
    return result


def reference_shapes(config: str, overrides: list[str]) -> dict[str, tuple]:
    cfg = load_config(config, overrides)
    with torch.device("meta"):
        model = LoopedLM(cfg.model)
    return _global_shapes(ShardedState(model, Topology()))


def layouts(gpus: int) -> list[tuple[int, int, int, int]]:
    """(tp, pp, dp, zero) over TP 1-8 and PP 1-8 that use `gpus` GPUs, ZeRO 0-2."""
    out = []
    for tp in (1, 2, 4, 8):
        for pp in (1, 2, 4, 8):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for zero in (0, 1, 2) if dp > 1 else (0,):
                out.append((tp, pp, dp, zero))
    return out
