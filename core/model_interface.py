"""What the parallel and data code may know of the looped model: its contract, not its class.

The circular pipeline (parallelism/pipeline.py), tensor parallelism and the checkpoint layout
drive the model through these names; `pretrain/model/looped.py` implements them. A change to
the model that breaks them breaks `LoopedModel` here, where both sides can see it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor, nn

IGNORE_INDEX = -100  # a label that adds nothing to the loss (padding, an unreadable shard)

Rope = tuple[Tensor, Tensor]


class KVStore(Protocol):
    """Where attention finds extra keys/values and leaves its own (training: nothing; decoding:
    the KV cache)."""

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict: ...

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None: ...


class NoKV:
    """Training: attention sees only the current sequence and nothing is kept."""

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict:
        return {}

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None:
        pass


class LoopFamilyTraits(Protocol):
    """What the parallel code asks of the model's loop family (pretrain/model/families/): the
    family itself is the model's business, never named here or in parallelism/."""

    reads_embedding: bool  # later loops read the embedding stream e (pipeline stage 0 keeps it)

    def ring_tensors(self, lap: int) -> int:
        """Hidden-sized tensors that travel between stages inside lap `lap`."""
        ...


@dataclass(frozen=True)
class LoopPlan:
    """How one training step loops (pretrain/model/recurrence.py draws it from the seed and the
    step): R loop steps, the last `backprop` of them with a graph (= R: all), and per
    micro-batch the seed of each sample's initial state (families that start from a random
    one)."""

    loops: int
    backprop: int
    state_seeds: tuple[tuple[int, ...], ...]
    # per micro-batch, each sample's (steps without a graph, steps with one) when the depth is
    # drawn per sequence (None: every sample runs the step's R)
    depths: tuple[tuple[tuple[int, int], ...], ...] | None = None

    @property
    def grad_from(self) -> int:
        """The first loop step (0-based) that builds a graph."""
        return self.loops - self.backprop


class DeferredReadout(Protocol):
    """Logits not yet computed (train.loss_chunk_tokens): the readout state h and a way to
    rebind the same readout to another tensor holding h (the pipeline hands h over between
    pieces, never the logits)."""

    h: Tensor

    def on(self, h: Tensor) -> DeferredReadout: ...


class LoopPass(Protocol):
    """What the loop steps of one forward share: rope, KV store, loop count, steps read out."""

    loops: int
    read_steps: range
    grad_from: int  # loop steps before this one build no graph (truncated backprop)


class LoopStep(Protocol):
    """The end of one loop step: its readout (logits None where not read out), the diagnostic
    and what the next loop step receives."""

    logits: object
    gate_logits: Tensor
    handover: Tensor

    def stream_norm(self) -> Tensor: ...


class LoopedModel(Protocol):
    """The pieces of one forward pass, in the order the pipeline runs them on its stages:
    begin -> embed_stream (stage 0, once) -> per loop step t: loop_input (stage 0) ->
    run_block (every stage, its slice of `block`) -> end_loop (the last stage: norm, readout,
    handover to step t + 1). Modules a stage does not own are None (or empty). Loop steps are
    0-based in code; metric names count them from 1 (`loop/ce_step1` is step 0)."""

    cfg: object  # the model section of the config (hidden_size, loops, loop_mode, ...)
    family: LoopFamilyTraits
    layer_offset: int  # index of block[0] in the whole shared block
    seq_shard: tuple[int, int]  # (index, count): the slice of the sequence the stream holds
    embed: nn.Module | None
    prelude: nn.ModuleList
    # the family's own modules, attributes of the model under these names: kept by the stage
    # that starts a lap (None elsewhere), replicated under tensor parallelism
    loop_modules: tuple[str, ...]
    # the family's modules run once per forward after the prelude (kept by stage 0) and once
    # per readout (kept by the last stage); replicated under tensor parallelism
    embedding_modules: tuple[str, ...]
    readout_modules: tuple[str, ...]
    block: nn.ModuleList  # the shared looped layers (each has .attn and .mlp)
    coda: nn.ModuleList
    norm: nn.Module | None
    lm_head: nn.Module | None
    gate: nn.Module | None

    def begin(self, ids: Tensor, store: KVStore | None = None, loops: int | None = None,
              read_steps: range | None = None, start: int = 0, backprop: int = 0,
              state: Tensor | None = None,
              state_seed: int | tuple[int, ...] | None = None) -> LoopPass: ...

    def embed_stream(self, ids: Tensor, run: LoopPass) -> Tensor: ...

    def loop_input(self, t: int, e: Tensor | None, h: Tensor | None,
                   run: LoopPass) -> tuple[Tensor, Tensor | None]: ...

    def run_block(self, t: int, x: Tensor, h: Tensor | None, run: LoopPass) -> Tensor: ...

    def end_loop(self, t: int, x: Tensor, run: LoopPass) -> LoopStep: ...

    def output(self, logits: list, gate_logits: Tensor, hidden_norm: Tensor) -> object:
        """The one output type of a forward, from every step's logits (None: not read out),
        gate logits [R, S, B] and stream norms [R]: what the local forward returns and what
        the pipeline's last stage hands the objective."""
        ...
