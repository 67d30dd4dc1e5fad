"""The step engine: how one optimizer step runs under this process's layout, chosen once.

Two independent choices, made at construction (OLMo-core's TrainModule, Megatron's
forward-backward function), so `Trainer.train_step` is one straight line:

  forward/backward   `LocalPass`: each micro-batch through the whole (maybe TP-sharded) model;
                     `PipelinePass`: the circular pipeline's schedule over all micro-batches
  reduce/clip/step   `PlainUpdate`: DP all-reduce, global norm, clip, optimizer step, all ranks
                     skipping a non-finite step together; `ZeroUpdate`: DeepSpeed does all that

`build_engine` also shapes the model for the layout (TP layers, the pipeline stage's slice),
freezes what the objective does not train, and builds the optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from core.model_interface import LoopPlan
from parallelism.grad_overlap import OverlappedGradReducer
from parallelism.grads import all_ranks_agree, global_grad_norm, layer_grad_norms
from parallelism.pipeline import PipelineStage, keep_stage, sum_tied_grads
from parallelism.pipeline_balance import describe
from parallelism.topology import Topology
from parallelism.zero import build_zero_engine
from pretrain.config import Config
from pretrain.model.flops import pipeline_split, stage_cost_model
from pretrain.model.looped import LoopedOutput
from pretrain.model.memory import MemoryPolicy
from pretrain.model.objective import (
    compute_objective,
    readout_steps,
    token_cross_entropy,
    trains_gate,
)
from pretrain.model.recurrence import Recurrence, mixed_seed
from pretrain.optim import build_optimizer, param_groups

Batches = list[tuple[Tensor, Tensor]]
# (LoopedOutput, labels) -> a result; the objective in training, the validation sums in eval
Readout = Callable[[LoopedOutput, Tensor], object]


class LocalPass:
    """Every micro-batch forward and backward through this process's whole model."""

    def __init__(self, model: nn.Module, read_steps: Callable[[int], range]):
        self.model, self.read_steps = model, read_steps

    def train(self, batches: Batches, objective: Readout, backward: Callable[[Tensor], None],
              plan: LoopPlan):
        total = torch.zeros((), device=batches[0][0].device)
        depths = plan.depths or [None] * len(batches)
        for (inputs, labels), seed, d in zip(batches, plan.state_seeds, depths, strict=True):
            out = self.model(inputs, loops=plan.loops, read_steps=self.read_steps(plan.loops),
                             backprop=plan.backprop, state_seed=seed, depths=d)
            out = objective(out, labels)
            backward(out.loss)
            total += out.loss.detach() / len(batches)
        return out, total

    @torch.no_grad()
    def evaluate(self, batches: Batches, readout: Readout, seeds: tuple[int, ...]) -> list:
        return [readout(self.model(inputs, state_seed=seed), labels)
                for (inputs, labels), seed in zip(batches, seeds, strict=True)]


class PipelinePass:
    """The circular pipeline: this stage's pieces of every micro-batch (parallelism/pipeline.py).
    Its backward runs inside the schedule; the result lives on the last stage (None elsewhere)."""

    def __init__(self, stage: PipelineStage, schedule: str):
        self.stage, self.schedule = stage, schedule

    def train(self, batches: Batches, objective: Readout, backward: Callable[[Tensor], None],
              plan: LoopPlan):
        out = self.stage.run(batches, self.schedule, objective, plan)
        return out, (out.loss if out is not None else torch.zeros((), device=batches[0][0].device))

    def evaluate(self, batches: Batches, readout: Readout, seeds: tuple[int, ...]) -> list | None:
        return self.stage.evaluate(batches, readout, seeds)


class PlainUpdate:
    """Gradients averaged over DP (bucket by bucket during backward: parallelism/grad_overlap.py),
    one global norm, clip, step (or skip on every rank)."""

    def __init__(self, model: nn.Module, optimizer, topo: Topology, grad_clip: float,
                 reducer: OverlappedGradReducer | None):
        self.model, self.optimizer, self.topo, self.clip = model, optimizer, topo, grad_clip
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.reducer = reducer  # None: one process per model replica, nothing to average

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        (loss / micro_batches).backward()

    def step(self, loss: Tensor, diagnostics: bool) -> tuple[Tensor, bool, list[float] | None]:
        if self.reducer is not None:
            self.reducer.finish()
        sum_tied_grads(self.model, self.topo)
        grad_norm = global_grad_norm(self.params, self.topo)
        layers = (layer_grad_norms(self.model, self.topo, self.model.cfg.num_layers)
                  if diagnostics else None)
        # asked as "is anything wrong", as DeepSpeed asks (pretrain/planning/fake_step.py reads False)
        bad = bool(~(torch.isfinite(loss) & torch.isfinite(grad_norm)))
        ok = all_ranks_agree(not bad, self.topo, self.topo.device)
        if ok:
            if self.clip:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, ok, layers


class ZeroUpdate:
    """DeepSpeed ZeRO reduces, clips and steps (and skips a non-finite step itself). Locally
    it sees every micro-batch (engine.backward + engine.step each); after the pipeline, which
    ran the backward, one reduction and step."""

    def __init__(self, engine, pipelined: bool, topo: Topology):
        self.engine, self.optimizer, self.pipelined = engine, engine.optimizer, pipelined
        self.topo = topo

    def backward(self, loss: Tensor, micro_batches: int) -> None:
        self.engine.backward(loss)  # scales by 1 / grad_accum_steps itself
        self.engine.step()  # updates at the last micro-batch only

    def step(self, loss: Tensor, diagnostics: bool) -> tuple[Tensor, bool, list[float] | None]:
        if self.pipelined:
            sum_tied_grads(self.engine.module, self.topo)  # before DeepSpeed reads .grad
            self.engine.allreduce_gradients()
            self.engine.step()
        ok = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None or not ok else float(norm))
        return grad_norm, ok, None  # DeepSpeed owns the gradients: no per-layer norms


@dataclass
class StepResult:
    out: object  # the last micro-batch's objective output (None off the last pipeline stage)
    loss: Tensor  # mean over the step's micro-batches
    grad_norm: Tensor
    ok: bool  # applied (False: skipped for a non-finite loss or gradient)
    layer_grad_norms: list[float] | None
    plan: LoopPlan  # the step's R and backprop window


class StepEngine:
    def __init__(self, cfg: Config, model: nn.Module, passes, update, cross_entropy,
                 autocast, pipeline: PipelineStage | None, split: list[int], dp_rank: int):
        self.cfg, self.model, self.passes, self.update = cfg, model, passes, update
        self.dp_rank = dp_rank
        self.split = split  # block layers per pipeline stage ([] without the pipeline)
        self.zero = getattr(update, "engine", None)  # the DeepSpeed engine under ZeRO
        self.optimizer = update.optimizer
        self.cross_entropy, self.autocast, self.pipeline = cross_entropy, autocast, pipeline

    def objective(self, out: LoopedOutput, labels: Tensor, cross_entropy=None):
        """The run's objective; `cross_entropy` replaces the layout's per-token CE (validation
        records each step's)."""
        return compute_objective(self.cfg.objective, out, labels,
                                 cross_entropy or self.cross_entropy)

    def loop_plan(self, step: int, micro_batches: int) -> LoopPlan:
        """Step `step`'s R, backprop window and state seeds (model/recurrence.py)."""
        t = self.cfg.train
        return Recurrence.of(self.cfg).plan(t.seed, step, self.dp_rank, micro_batches,
                                            t.micro_batch_size, self.cfg.parallel.data)

    def train_step(self, batches: Batches, step: int, diagnostics: bool = False) -> StepResult:
        """Optimizer step `step` over `batches`; `diagnostics`: also the per-layer grad norms."""
        self.model.train()
        plan = self.loop_plan(step, len(batches))
        with self.autocast():
            out, loss = self.passes.train(
                batches, self.objective, lambda lo: self.update.backward(lo, len(batches)), plan)
        grad_norm, ok, layers = self.update.step(loss, diagnostics)
        return StepResult(out, loss, grad_norm, ok, layers, plan)

    def evaluate(self, batches: Batches, readout: Readout) -> list | None:
        """`readout` of every micro-batch, forward only (None off the last pipeline stage);
        a family's initial states are seeded by (seed, micro-batch), the same every pass."""
        self.model.eval()
        seeds = tuple(mixed_seed(self.cfg.train.seed, -1, self.dp_rank, i)
                      for i in range(len(batches)))
        with self.autocast():
            return self.passes.evaluate(batches, readout, seeds)


def shape_for_layout(cfg: Config, model: nn.Module, topo: Topology,
                     log: Callable[[str], None]) -> tuple[Callable, list[int]]:
    """Make `model` (built whole from the seed) this rank's part of the layout: TP layers, the
    memory policy, the pipeline stage's slice, what the objective freezes. Returns the
    per-token CE to use and the pipeline split ([] without the pipeline). `pretrain plan
    --rehearse` runs exactly this on the meta device."""
    t = cfg.train
    cross_entropy = token_cross_entropy
    if topo.tp > 1:
        # imported here: megatron-core takes seconds to import, a run without TP never does
        from parallelism.tensor_parallel import parallelize_tensor, vocab_parallel_token_ce

        parallelize_tensor(model, topo, cfg.parallel.sequence_parallel)
        cross_entropy = vocab_parallel_token_ce
    model.set_memory(MemoryPolicy.of(t, topo.tp if cfg.parallel.sequence_parallel else 1))
    split = []
    if topo.pp > 1:
        split = pipeline_split(cfg)
        keep_stage(model, split, topo.pp_rank)
        log(f"pipeline split ({'explicit' if cfg.parallel.pipeline_split else 'auto'}): "
            f"{describe(stage_cost_model(cfg), split)}")
    for name, p in model.named_parameters():
        if cfg.objective.kind == "adaptive_gate":  # stage 2: LM frozen, only the gate learns
            p.requires_grad_(name.startswith("gate."))
        elif not trains_gate(cfg.objective.kind):  # the FLT objectives leave the gate alone
            p.requires_grad_(not name.startswith("gate."))
    return cross_entropy, split


def build_engine(cfg: Config, model: nn.Module, topo: Topology,
                 log: Callable[[str], None]) -> StepEngine:
    """Shape `model` for this rank and pick the two halves."""
    t = cfg.train
    cross_entropy, split = shape_for_layout(cfg, model, topo, log)
    def read_steps(loops: int) -> range:
        return readout_steps(cfg.objective.kind, loops)

    if any(p.device != topo.device for p in model.parameters()):  # (fake tensors cannot move)
        model.to(topo.device)
    pipeline = None
    if topo.pp > 1:
        pipeline = PipelineStage(model, topo, cfg, read_steps)
        passes = PipelinePass(pipeline, cfg.parallel.pipeline_schedule)
    else:
        passes = LocalPass(model, read_steps)
    if cfg.parallel.zero_stage:
        zero = build_zero_engine(model, param_groups(model, cfg.optim), cfg, topo,
                                 pipeline=pipeline is not None)
        update = ZeroUpdate(zero, pipelined=pipeline is not None, topo=topo)
    else:
        p = cfg.parallel
        # overlap launches a bucket at its count of backward contributions, which the same
        # schedule repeats every step; a drawn or grown R changes the count, so reduce after backward
        overlap = p.overlap_grad_reduce and not Recurrence.of(cfg).varies
        reducer = (OverlappedGradReducer(model, topo.dp_group, topo.dp, p.grad_bucket_mb,
                                         overlap) if topo.dp > 1 else None)
        update = PlainUpdate(model, build_optimizer(model, cfg.optim), topo, cfg.optim.grad_clip,
                             reducer)
    if t.compile:
        for layer in (*model.prelude, *model.block, *model.coda):
            layer.compile()  # one graph: every loop (and layer) calls the same code
    device = topo.device.type
    autocast = ((lambda: torch.autocast(device, dtype=torch.bfloat16))
                if t.precision == "bf16" else nullcontext)
    return StepEngine(cfg, model, passes, update, cross_entropy, autocast, pipeline, split,
                      topo.dp_rank)
