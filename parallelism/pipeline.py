"""The circular pipeline: the shared looped block unrolled across pipeline stages.

Stage k owns a contiguous slice of the block's layers (and nothing else of it); stage 0 also
owns the embedding and prelude, the last stage the coda, final norm, LM head and exit gate. A
microbatch makes R laps of the ring: lap t runs every slice in order, the last stage computes
that step's per-token CE_t and gate logits and sends the hidden state back to stage 0 for lap
t + 1; after lap R it combines all steps into the ELBO loss.

Why our own schedule over torch.distributed isend/irecv instead of torch.distributed.pipelining:
the R laps of a rank are virtual stages that share one module, and the stock interleaved
schedules give wrong gradients when virtual stages share weights (measured: 0.54-0.69 relative
error at R=2); owning the loop also keeps megatron-core TP layers and the optimizer (ZeRO)
untouched -- the pipeline only decides when each piece's forward and backward run.

Each piece (microbatch, lap) runs forward on its own autograd graph. Tensors that cross pieces
are handed over as detached leaves: the hidden state (sent to the next stage), and the signals
that stay on this stage -- loop 1's keys/values (attention injection), each layer's consumed
input (fully looped), the last stage's CE_t and gate logits (consumed by the loss at lap R).
A piece's backward runs autograd on its outputs with the gradients its consumers left on those
leaves. Pieces of one microbatch run backward in reverse lap order, so every consumer's
gradient has arrived before its producer's backward -- exactly the sums autograd forms in one
process, and the parameter gradients of all laps accumulate in the same .grad (nothing to
all-reduce across stages).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallelism.pipeline_schedule import Piece, schedule
from parallelism.topology import Topology
from pretrain.model.looped import LoopedLM, LoopedOutput
from pretrain.model.objective import ObjectiveOutput, compute_objective

RECV_AHEAD = 2  # pieces whose inputs are received ahead, overlapping transfers with compute


def keep_stage(model: LoopedLM, split: list[int], stage: int) -> None:
    """Drop everything stage `stage` does not own (the full model was built from the seed,
    so the kept weights are exactly those of the single-process model)."""
    first, last = stage == 0, stage == len(split) - 1
    start = sum(split[:stage])
    model.block = nn.ModuleList(list(model.block)[start:start + split[stage]])
    model.layer_offset = start
    if not first:
        model.embed, model.prelude = None, nn.ModuleList()
    if not last:
        model.coda, model.norm, model.lm_head, model.gate = nn.ModuleList(), None, None, None


def global_name(model: LoopedLM, name: str) -> str:
    """A stage's parameter name in the single-process model ('block.0' -> 'block.offset')."""
    if name.startswith("block."):
        i, rest = name[len("block."):].split(".", 1)
        return f"block.{int(i) + getattr(model, 'layer_offset', 0)}.{rest}"
    return name


def gather_stages(model: LoopedLM, state: dict[str, Tensor], topo: Topology) -> dict[str, Tensor]:
    """The single-process state dict from every stage's (global-named) part, on every rank."""
    mine = {global_name(model, k): v.cpu() for k, v in state.items()}
    parts: list = [None] * topo.pp
    dist.all_gather_object(parts, mine, group=topo.pp_group)
    return {k: v for part in parts for k, v in part.items()}


def _leaf(t: Tensor) -> Tensor:
    return t.detach().requires_grad_(t.requires_grad)


@dataclass
class _Handoff:
    """A tensor produced by one piece and consumed by later pieces on this stage."""

    real: Tensor
    leaf: Tensor

    @classmethod
    def of(cls, t: Tensor) -> _Handoff:
        return cls(t, _leaf(t))


@dataclass
class _Microbatch:
    ids: Tensor
    labels: Tensor
    first_kv: dict[int, tuple[_Handoff, _Handoff]] = field(default_factory=dict)
    signals: list[_Handoff] | None = None
    steps: list[tuple[_Handoff, _Handoff]] = field(default_factory=list)  # (logits, gate) per lap
    pieces: dict[int, dict] = field(default_factory=dict)  # lap -> what its backward needs
    result: ObjectiveOutput | None = None


class _PieceKV:
    """KV store of one piece: loop 1's keys/values are saved (lap 0) or served as leaves."""

    def __init__(self, mb: _Microbatch, lap: int, inject: bool):
        self.mb, self.lap, self.inject = mb, lap, inject

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict:
        if self.inject and segment == "block" and loop > 0:
            k, v = self.mb.first_kv[layer]
            return {"inject": (k.leaf, v.leaf)}
        return {}

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None:
        if self.inject and segment == "block" and loop == 0:
            self.mb.first_kv[layer] = (_Handoff.of(k), _Handoff.of(v))


class PipelineStage:
    def __init__(self, model: LoopedLM, topo: Topology, cfg, cross_entropy):
        self.model, self.topo, self.cfg, self.ce = model, topo, cfg, cross_entropy
        self.stages, self.rank = topo.pp, topo.pp_rank
        self.first, self.last = self.rank == 0, self.rank == topo.pp - 1
        self.loops = cfg.model.loops
        self.peak_live = 0  # most pieces alive at once in the last step (stashed activations)
        self.busy_s = self.wait_s = self.wall_s = 0.0  # compute / blocked in recv / wall, last step

    # -- one piece ---------------------------------------------------------------------------
    def _forward(self, mb: _Microbatch, lap: int, h_in: Tensor | None, scale: float) -> dict:
        """Run piece (mb, lap); returns what its backward needs ('h_out' goes downstream)."""
        model = self.model
        rope = model.rope(torch.arange(mb.ids.shape[1], device=mb.ids.device))
        store = _PieceKV(mb, lap, model.cfg.attention_injection)
        saved: dict = {"h_in": h_in}
        if h_in is None:  # stage 0, lap 0
            h_in_model, _ = model.run_layers("prelude", 0, model.embed(mb.ids.t()), rope, store)
        else:
            h_in_model = h_in
        signals_in = [s.leaf for s in mb.signals] if mb.signals is not None else None
        h, consumed = model.run_layers("block", lap, h_in_model, rope, store, signals_in)
        if consumed is not None:
            mb.signals = [_Handoff.of(c) for c in consumed]
            saved["handoffs"] = list(mb.signals)
        if lap == 0:
            saved.setdefault("handoffs", []).extend(t for kv in mb.first_kv.values() for t in kv)
        if not self.last:
            saved["h_out"] = h
            return saved
        logits, gate = model.readout(h, lap, rope, store)
        if lap < self.loops - 1:
            mb.steps.append((_Handoff.of(logits), _Handoff.of(gate)))
            saved.setdefault("handoffs", []).extend(mb.steps[-1])
            saved["h_out"] = h
            return saved
        out = LoopedOutput([st[0].leaf for st in mb.steps] + [logits],
                           torch.stack([st[1].leaf for st in mb.steps] + [gate]))
        mb.result = compute_objective(self.cfg.objective, out, mb.labels, self.ce)
        saved["loss"] = mb.result.loss * scale
        return saved

    @staticmethod
    def _backward(saved: dict, grad_out: Tensor | None) -> Tensor | None:
        """Backward of one piece; returns the gradient of its input hidden state."""
        outputs, grads = [], []
        if "loss" in saved:
            outputs.append(saved["loss"])
            grads.append(torch.ones_like(saved["loss"]))
        if "h_out" in saved:
            outputs.append(saved["h_out"])
            grads.append(grad_out)
        for handoff in saved.get("handoffs", []):
            if handoff.leaf.grad is not None:
                outputs.append(handoff.real)
                grads.append(handoff.leaf.grad)
        torch.autograd.backward(outputs, grads)
        h_in = saved["h_in"]
        return None if h_in is None else h_in.grad

    # -- the whole step ----------------------------------------------------------------------
    def run(self, batches: list[tuple[Tensor, Tensor]], kind: str) -> ObjectiveOutput | None:
        """Forward and backward of every microbatch (gradients accumulate, scaled 1/m);
        returns on the last stage the last microbatch's objective with the loss averaged over
        the microbatches, None elsewhere."""
        m = len(batches)
        mbs = [_Microbatch(ids, labels) for ids, labels in batches]
        b, s = batches[0][0].shape
        rows = s // self.topo.tp if self.cfg.parallel.sequence_parallel else s
        shape = (rows, b, self.cfg.model.hidden_size)
        device = batches[0][0].device
        pending: list[dist.Work] = []
        total = torch.zeros((), device=device)
        live = self.peak_live = 0
        self.busy_s, self.wait_s, start = 0.0, 0.0, time.perf_counter()
        pieces = schedule(kind, self.stages, self.loops, m, self.rank)
        posted: dict[Piece, tuple[Tensor, dist.Work]] = {}
        for i, piece in enumerate(pieces):
            for ahead in pieces[i:i + RECV_AHEAD + 1]:  # receives run while this piece computes
                if ahead not in posted and self._needs_recv(ahead):
                    posted[ahead] = self._post_recv(shape, device, ahead)
            mb = mbs[piece.mb]
            received = self._wait(*posted.pop(piece)) if piece in posted else None
            t0 = time.perf_counter()
            if piece.kind == "F":
                h_in = None if received is None else received.requires_grad_()
                mb.pieces[piece.lap] = saved = self._forward(mb, piece.lap, h_in, 1.0 / m)
                if "h_out" in saved:
                    pending.append(self._send(saved["h_out"].detach(), piece, grad=False))
                live += 1
            else:
                saved = mb.pieces.pop(piece.lap)
                grad_in = self._backward(saved, received)
                if grad_in is not None:
                    pending.append(self._send(grad_in, piece, grad=True))
                if "loss" in saved:
                    total += mb.result.loss.detach() / m
                live -= 1
            self.busy_s += time.perf_counter() - t0
            self.peak_live = max(self.peak_live, live)
        for work in pending:
            work.wait()
        self.wall_s = time.perf_counter() - start
        if not self.last:
            return None
        result = mbs[-1].result
        result.loss = total
        return result

    # -- point to point: one message per (microbatch, receiving virtual stage, direction) -----
    def _virtual(self, piece: Piece) -> int:
        return piece.lap * self.stages + self.rank

    def _tag(self, mb: int, virtual: int, grad: bool) -> int:
        return (mb * self.loops * self.stages + virtual) * 2 + int(grad)

    def _send(self, t: Tensor, piece: Piece, grad: bool) -> dist.Work:
        to = self._virtual(piece) + (-1 if grad else 1)
        peer = self.topo.pp_prev if grad else self.topo.pp_next
        return dist.isend(t.contiguous(), peer, tag=self._tag(piece.mb, to, grad))

    def _needs_recv(self, piece: Piece) -> bool:
        if piece.kind == "F":
            return not (self.first and piece.lap == 0)
        return not (self.last and piece.lap == self.loops - 1)

    def _post_recv(self, shape, device, piece: Piece) -> tuple[Tensor, dist.Work]:
        grad = piece.kind == "B"
        t = torch.empty(shape, device=device)
        peer = self.topo.pp_next if grad else self.topo.pp_prev
        return t, dist.irecv(t, peer, tag=self._tag(piece.mb, self._virtual(piece), grad))

    def _wait(self, t: Tensor, work: dist.Work) -> Tensor:
        t0 = time.perf_counter()
        work.wait()
        self.wait_s += time.perf_counter() - t0
        return t
