"""The circular pipeline: the shared looped block unrolled across pipeline stages.

Stage k owns a contiguous slice of the block's layers (and nothing else of it); stage 0 also
owns the embedding, prelude and the loop family's modules (it builds every lap's input), the last
stage the coda, final norm, LM head and exit gate (a head tied to the embedding: both stages
hold the weight, their gradients summed each step, `sum_tied_grads`). A *lap* is one pass of a
microbatch around the ring: lap t (0-based) runs loop step t through every stage's slice in
order, and a microbatch makes R laps. The last stage ends the loop step (`end_loop`: norm, readout,
handover) and sends what it hands over back to stage 0 for lap
t + 1; after the last lap the objective combines every step's readout into the loss.

Why our own schedule over torch.distributed isend/irecv instead of torch.distributed.pipelining:
the R laps of a rank are virtual stages that share one module, and the stock interleaved
schedules give wrong gradients when virtual stages share weights (measured: 0.54-0.69 relative
error at R=2); owning the loop also keeps megatron-core TP layers and the optimizer (ZeRO)
untouched -- the pipeline only decides when each piece's forward and backward run.

What crosses the ring is the loop family's to say (`model.family`, core/model_interface.py):
inside a lap the stream x_t goes from stage to stage, together with h_{t-1} where every layer
reads it (`ring_tensors(lap)`: the count of hidden-sized tensors); at a lap boundary the last
stage sends what the step hands over back to stage 0, which builds the next lap's input from
it and, for a family that `reads_embedding`, from the embedding stream e it keeps.

A step's R comes from its `LoopPlan` (the sampler may change it every step), and so does the
backprop window: laps before `grad_from` run forward only -- all microbatches, lap by lap, no
activations kept, no backward scheduled -- and the 1F1B schedule is built over the window's
laps. Stage 0 recomputes the embedding stream with a graph at the first lap of the window
(the laps before it read a graph-free copy): a prelude forward more, no activations kept for
the no-graph laps.

Each piece (microbatch, lap) runs forward on its own autograd graph. Tensors that cross pieces
are handed over as detached leaves: the message (sent to the next stage), and what stays on
this stage -- stage 0's embedding stream e, the last stage's CE_t and gate logits (consumed by
the loss at lap R). A piece's backward runs autograd on its outputs with the gradients its
consumers left on those leaves. Pieces of one microbatch run backward in reverse lap order, so
every consumer's gradient has arrived before its producer's backward -- exactly the sums
autograd forms in one process, and the parameter gradients of all laps accumulate in the same
.grad (nothing to all-reduce across stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from core.model_interface import LoopedModel, LoopPlan
from parallelism.pipeline_messages import Action, Ring
from parallelism.pipeline_schedule import Piece, schedule
from parallelism.timing import DeviceClock
from parallelism.topology import Topology

# the last stage's end of a microbatch: (the model's output, as its local forward returns it
# -- `LoopedModel.output` --, labels) -> the objective's result (it has a `.loss`)
Objective = Callable[[Any, Tensor], Any]


def ring_payload(model: LoopedModel, lap: int, to_first: bool) -> int:
    """Hidden-sized tensors in the message that starts lap `lap`'s piece on the receiver: the
    handover alone at a lap boundary (to stage 0), what the family sends inside a lap."""
    return 1 if to_first else model.family.ring_tensors(lap)


def keep_stage(model: LoopedModel, split: list[int], stage: int) -> None:
    """Drop everything stage `stage` does not own (the full model was built from the seed,
    so the kept weights are exactly those of the single-process model)."""
    first, last = stage == 0, stage == len(split) - 1
    start = sum(split[:stage])
    model.block = nn.ModuleList(list(model.block)[start:start + split[stage]])
    model.layer_offset = start
    tied = getattr(model.cfg, "tie_embeddings", False)
    if last and not first and tied:
        # the head's weight is the embedding's: the last stage keeps the embedding module as
        # its holder (so it is named embed.weight as in one process), a copy of stage 0's
        # that `sum_tied_grads` keeps equal; DeepSpeed's mark keeps it out of the norm twice
        model.embed.weight.ds_pipe_replicated = True
    if not first:
        model.prelude = nn.ModuleList()
        if not (last and tied):
            model.embed = None
        for name in (*model.loop_modules, *model.embedding_modules):
            setattr(model, name, None)
    if not last:
        model.coda, model.norm, model.lm_head, model.gate = nn.ModuleList(), None, None, None
        for name in model.readout_modules:
            setattr(model, name, None)


def sum_tied_grads(model: LoopedModel, topo: Topology) -> None:
    """The tied embedding's gradient summed over the first and last stage (its use as the
    embedding on one, as the head on the other), so both copies take the same update --
    Megatron's embedding-group all-reduce. Call once the step's backward (and its data-
    parallel average, which commutes with the sum) is done."""
    if topo.tied_group is None or not getattr(model.cfg, "tie_embeddings", False):
        return
    grad = model.embed.weight.grad
    if grad is None:  # (a frozen embedding: every stage agrees on that)
        return
    dist.all_reduce(grad, group=topo.tied_group)


def global_name(model: LoopedModel, name: str) -> str:
    """A stage's parameter name in the single-process model ('block.0' -> 'block.offset')."""
    if name.startswith("block."):
        i, rest = name[len("block."):].split(".", 1)
        return f"block.{int(i) + getattr(model, 'layer_offset', 0)}.{rest}"
    return name


def gather_stages(model: LoopedModel, state: dict[str, Tensor], topo: Topology) -> dict[str, Tensor]:
    """The single-process state dict from every stage's (global-named) part, on every rank."""
    mine = {global_name(model, k): v.cpu() for k, v in state.items()}
    parts: list = [None] * topo.pp
    dist.all_gather_object(parts, mine, group=topo.pp_group)
    return {k: v for part in parts for k, v in part.items()}


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad)


@dataclass
class _Handoff:
    """A tensor produced by one piece and consumed by later pieces on this stage; `value` is
    what the consumer reads. A deferred readout (train.loss_chunk_tokens: an object with the
    state `.h` and `.on(h)`, core/model_interface.py) hands over its [S, B, H] state, not
    [S, B, V] logits: the loss at lap R computes them chunk by chunk."""

    real: Tensor
    leaf: Tensor
    value: Any

    @classmethod
    def of(cls, t) -> _Handoff:
        if isinstance(t, Tensor):
            leaf = _leaf(t)
            return cls(t, leaf, leaf)
        leaf = _leaf(t.h)
        return cls(t.h, leaf, t.on(leaf))


@dataclass
class _Microbatch:
    ids: Tensor
    labels: Tensor
    # seeds the family's initial state per sample, if it has one (stage 0)
    state_seed: tuple[int, ...] | None = None
    depths: tuple[tuple[int, int], ...] | None = None  # each sample's own depth (LoopPlan)
    carry: dict = field(default_factory=dict)  # what its laps keep between them on stage 0
    e: _Handoff | None = None  # stage 0: the embedding stream, for modes that reuse it
    steps: list[tuple[_Handoff, _Handoff]] = field(default_factory=list)  # (logits, gate) per lap
    norms: list[Tensor] = field(default_factory=list)  # last stage: |x_t| per lap (diagnostic)
    pieces: dict[int, dict] = field(default_factory=dict)  # lap -> what its backward needs
    result: Any = None  # the objective's output, on the last stage after lap R


class PipelineStage:
    """This rank's stage of the ring; `read_steps(R)` are the loop steps training reads out at
    R loops (an objective may skip some)."""

    def __init__(self, model: LoopedModel, topo: Topology, cfg, read_steps: Callable[[int], range]):
        self.model, self.topo, self.cfg = model, topo, cfg
        self.stages, self.rank = topo.pp, topo.pp_rank
        self.first, self.last = self.rank == 0, self.rank == topo.pp - 1
        self.loops = cfg.model.loops  # R of the step being run
        self.grad_from = 0  # its first lap with a graph
        self.read_steps = read_steps
        self.peak_live = 0  # most pieces alive at once in the last step (stashed activations)
        self.clock = DeviceClock(torch.device("cpu"))  # compute and wall time of the last step
        self.sent_bytes = 0  # point-to-point bytes this stage sent in the last step
        self._orders: dict[tuple, list[Action]] = {}  # this rank's ring order per step shape

    # -- one piece ---------------------------------------------------------------------------
    def _forward(self, mb: _Microbatch, lap: int, received: list[Tensor] | None,
                 scale: float, objective: Objective, read_steps: range) -> dict:
        """Run piece (mb, lap); returns what its backward needs ('out' goes downstream)."""
        model = self.model
        run = model.begin(mb.ids, loops=self.loops, read_steps=read_steps,
                          backprop=self.loops - self.grad_from, state_seed=mb.state_seed,
                          depths=mb.depths, carry=mb.carry)
        saved: dict = {"inputs": received or [], "handoffs": []}
        if self.first:
            reads_e = model.family.reads_embedding
            if lap == 0 or (lap == self.grad_from and reads_e):  # the window's first lap: e
                # again, with a graph
                e = model.embed_stream(mb.ids, run)
                if reads_e and self.loops > 1:
                    mb.e = _Handoff.of(e)
                    saved["handoffs"].append(mb.e)
            else:
                e = None if mb.e is None else mb.e.leaf
            x, h = model.loop_input(lap, e, None if lap == 0 else received[0], run)
        else:
            x, h = received[0], (received[1] if len(received) > 1 else None)
        x = model.run_block(lap, x, h, run)
        if not self.last:
            saved["out"] = [x, h] if ring_payload(model, lap, False) == 2 else [x]
            return saved
        step = model.end_loop(lap, x, run)
        mb.norms.append(step.stream_norm())
        if lap < self.loops - 1:
            mb.steps.append((None if step.logits is None else _Handoff.of(step.logits),
                             _Handoff.of(step.gate_logits)))
            saved["handoffs"].extend(t for t in mb.steps[-1] if t is not None)
            saved["out"] = [step.handover]
            return saved
        mb.result = objective(model.output(
            [None if st[0] is None else st[0].value for st in mb.steps] + [step.logits],
            torch.stack([st[1].leaf for st in mb.steps] + [step.gate_logits]),
            torch.stack(mb.norms)), mb.labels)
        if torch.is_grad_enabled():
            saved["loss"] = mb.result.loss * scale
        return saved

    @staticmethod
    def _backward(saved: dict, grad_out: Tensor | None) -> Tensor | None:
        """Backward of one piece; returns the gradients of its received tensors, stacked."""
        outputs, grads = [], []
        if "loss" in saved:
            outputs.append(saved["loss"])
            grads.append(torch.ones_like(saved["loss"]))
        for t, g in zip(saved.get("out", []), grad_out if "out" in saved else [], strict=True):
            if t.requires_grad:  # not: h_{t-1} passed on from a lap without a graph
                outputs.append(t)
                grads.append(g)
        for handoff in saved["handoffs"]:
            if handoff.leaf.grad is not None:
                outputs.append(handoff.real)
                grads.append(handoff.leaf.grad)
        torch.autograd.backward(outputs, grads)
        inputs = saved["inputs"]
        if not inputs or not inputs[0].requires_grad:  # none, or from a lap without a graph
            return None
        return torch.stack([t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs])

    # -- the whole step ----------------------------------------------------------------------
    def run(self, batches: list[tuple[Tensor, Tensor]], kind: str, objective: Objective,
            plan: LoopPlan) -> Any:
        """Forward and backward of every microbatch at the plan's R and backprop window
        (gradients accumulate, scaled 1/m); returns on the last stage the last microbatch's
        objective with the loss averaged over the microbatches, None elsewhere."""
        depths = plan.depths or [None] * len(batches)
        mbs = [_Microbatch(ids, labels, seed, d) for (ids, labels), seed, d
               in zip(batches, plan.state_seeds, depths, strict=True)]
        self.loops, self.grad_from = plan.loops, plan.grad_from
        m = len(mbs)

        def pieces(rank: int) -> list[Piece]:
            ahead = [Piece("F", mb, lap) for lap in range(self.grad_from) for mb in range(m)]
            return ahead + [Piece(p.kind, p.mb, p.lap + self.grad_from)
                            for p in schedule(kind, self.stages, plan.backprop, m, rank)]

        total = self._drive(mbs, kind, pieces, objective, self.read_steps(plan.loops))
        if not self.last:
            return None
        result = mbs[-1].result
        result.loss = total
        return result

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[Tensor, Tensor]], readout: Objective,
                 seeds: tuple[int, ...]) -> list | None:
        """Forward only at model.loops, every loop step read out: `readout`'s result per
        microbatch on the last stage (validation), None elsewhere."""
        mbs = [_Microbatch(ids, labels, seed)
               for (ids, labels), seed in zip(batches, seeds, strict=True)]
        self.loops, self.grad_from = self.cfg.model.loops, 0
        m = len(mbs)

        def pieces(rank: int) -> list[Piece]:  # lap by lap over every microbatch
            return [Piece("F", mb, lap) for lap in range(self.loops) for mb in range(m)]

        self._drive(mbs, "eval", pieces, readout, range(self.loops))
        return [mb.result for mb in mbs] if self.last else None

    def _drive(self, mbs: list[_Microbatch], kind: str, pieces: Callable[[int], list[Piece]],
               objective: Objective, read_steps: range) -> Tensor:
        """Run this rank's pieces (`pieces(rank)`: any rank's, for the schedule `kind`),
        posting each receive where the ring's global order puts it (pipeline_messages.py,
        cached per step shape); returns the mean loss (last stage)."""
        m = len(mbs)
        ring = Ring(self.stages, self.loops, self.grad_from)
        key = (kind, ring, m)
        if key not in self._orders:
            self._orders[key] = ring.actions([pieces(r) for r in range(self.stages)])[self.rank]
        b, s = mbs[0].ids.shape
        rows = s // self.topo.tp if self.cfg.parallel.sequence_parallel else s
        shape = (rows, b, self.cfg.model.hidden_size)
        device = mbs[0].ids.device
        pending: list[dist.Work] = []
        total = torch.zeros((), device=device)
        live = self.peak_live = 0
        self.sent_bytes = 0
        self.clock = clock = DeviceClock(device)
        posted: dict[Piece, tuple[Tensor, dist.Work]] = {}
        for action, piece in self._orders[key]:
            if action == "recv":
                posted[piece] = self._post_recv(shape, device, piece)
                continue
            mb = mbs[piece.mb]
            received = None
            if piece in posted:
                t, work = posted.pop(piece)
                work.wait()
                received = t
            if received is not None and piece.kind == "F":
                received = list(received.unbind(0))
            clock.start()
            dest = ring.sends_to(self.rank, piece)
            if piece.kind == "F":
                grad = torch.is_grad_enabled() and piece.lap >= self.grad_from
                # stage 0's input at the window's first lap came from a lap without a graph
                feeds = grad and not (self.first and piece.lap == self.grad_from)
                inputs = None if received is None else [t.requires_grad_(feeds) for t in received]
                with torch.set_grad_enabled(grad):
                    saved = self._forward(mb, piece.lap, inputs, 1.0 / m, objective, read_steps)
                message = None if dest is None else torch.stack([t.detach() for t in saved["out"]])
                if grad:
                    mb.pieces[piece.lap] = saved
                    live += 1
            else:
                saved = mb.pieces.pop(piece.lap)
                message = self._backward(saved, received)
                if "loss" in saved:
                    total += mb.result.loss.detach() / m
                live -= 1
            if dest is not None:
                pending.append(self._send(message, dest[0]))
            clock.stop()
            self.peak_live = max(self.peak_live, live)
        for work in pending:
            work.wait()
        clock.end()
        return total

    @property
    def busy_s(self) -> float:
        """Seconds this stage computed in the last step (device time on CUDA)."""
        return self.clock.busy_s()

    @property
    def wall_s(self) -> float:
        """Seconds the last step took on this stage, idle waits included."""
        return self.clock.wall_s()

    # -- point to point: paired by issue order (pipeline_messages.py), never by tag ----------
    def _send(self, t: Tensor | None, stage: int) -> dist.Work:
        if t is None:
            raise RuntimeError("pipeline: a piece the ring order expects a message from sent none")
        self.sent_bytes += t.numel() * t.element_size()
        peer = self.topo.pp_next if stage == (self.rank + 1) % self.stages else self.topo.pp_prev
        return dist.isend(t.contiguous(), peer)

    def _message_count(self, piece: Piece) -> int:
        """Hidden-sized tensors in the message piece waits for (its input, or the gradient of
        its output)."""
        if piece.kind == "F":
            return ring_payload(self.model, piece.lap, self.first)
        return 1 if self.last else ring_payload(self.model, piece.lap, False)

    def _post_recv(self, shape, device, piece: Piece) -> tuple[Tensor, dist.Work]:
        t = torch.empty((self._message_count(piece), *shape), device=device)
        peer = self.topo.pp_next if piece.kind == "B" else self.topo.pp_prev
        return t, dist.irecv(t, peer)
