"""`pretrain plan --fake`: every pipeline stage's real step under fake tensors
(pretrain/planning/fake_step.py) beside the throughput model's figures for the same layout
(pretrain/planning/planner.py), so a planner term that misses shows as a ratio before a job is queued.

Compared per layout: the fullest stage's peak bytes with the planner's memory total, the
stages' executed FLOPs summed with the planner's per-GPU FLOPs times PP, and the collectives'
bytes (TP's and DP's, summed over the kinds; the pipeline's sends apart) with the planner's
communication model.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config
from pretrain.planning.fake_step import StageProfile, profile_layout
from pretrain.planning.hardware import Accelerator
from pretrain.planning.planner import Estimate, Layout, estimate

P2P = ("send", "recv")


@dataclass
class LayoutCheck:
    stages: list[StageProfile]
    plan: Estimate

    @property
    def peak_bytes(self) -> int:
        return max(s.peak_bytes for s in self.stages)

    @property
    def memory_ratio(self) -> float:
        return self.peak_bytes / (self.plan.memory_gb["total"] * 2**30)

    @property
    def flops_ratio(self) -> float:
        return sum(s.flops for s in self.stages) / (self.plan.flops * self.plan.layout.pp)

    @property
    def collective_bytes(self) -> float:
        """The fullest stage's collective bytes (not the pipeline's point-to-point)."""
        return max(sum(v for k, v in s.comm.items() if not k.startswith(P2P))
                   for s in self.stages)

    @property
    def comm_ratio(self) -> float | None:
        planned = sum(self.plan.comm_bytes.values())
        return self.collective_bytes / planned if planned else None


def layout_of(cfg: Config) -> Layout:
    p, t = cfg.parallel, cfg.train
    return Layout(p.tensor, p.pipeline, p.data, t.micro_batch_size, t.grad_accum_steps,
                  zero=p.zero_stage > 0)


def check_layout(cfg: Config, gpu: Accelerator) -> LayoutCheck:
    lay = layout_of(cfg)
    plan = estimate(cfg, lay, gpu, lay.dp * lay.micro_batch * lay.microbatches)
    return LayoutCheck(profile_layout(cfg), plan)


def report(check: LayoutCheck) -> list[str]:
    gib = 2**30
    lay = check.plan.layout
    lines = [f"TP {lay.tp} x PP {lay.pp} x DP {lay.dp}, ZeRO {int(lay.zero and lay.dp > 1)}, "
             f"micro-batch {lay.micro_batch} x {lay.microbatches}: the step of one rank per "
             f"stage under fake tensors",
             f"{'stage':>5} {'rank':>5} | {'peak GiB':>8} | {'static GiB':>10} | {'TFLOP':>8} | "
             f"{'ops':>8} | collectives MiB"]
    for s in check.stages:
        comm = ", ".join(f"{k} {v / 2**20:,.0f}" for k, v in sorted(s.comm.items())) or "none"
        lines.append(f"{s.stage:>5} {s.rank:>5} | {s.peak_bytes / gib:8.2f} | "
                     f"{s.static_bytes / gib:10.2f} | {s.flops / 1e12:8.1f} | {s.ops:>8,} | {comm}")
    mem = check.plan.memory_gb
    parts = ", ".join(f"{k} {v:.2f}" for k, v in mem.items() if k != "total")
    lines.append(f"planner: {mem['total']:.2f} GiB ({parts}); {check.plan.flops / 1e12:.1f} "
                 f"TFLOP per GPU; collectives {sum(check.plan.comm_bytes.values()) / 2**20:,.0f} MiB")
    comm = "n/a" if check.comm_ratio is None else f"{check.comm_ratio:.3f}"
    lines.append(f"fake / planner: memory {check.memory_ratio:.3f}, FLOPs {check.flops_ratio:.3f}, "
                 f"collective bytes {comm}")
    return lines
