"""What the parallel and data code may know of the looped model: its contract, not its class.

The circular pipeline (parallelism/pipeline.py), tensor parallelism and the checkpoint layout
drive the model through these names; `pretrain/model/looped.py` implements them. A change to
the model that breaks them breaks `LoopedModel` here, where both sides can see it.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

IGNORE_INDEX = -100  # a label that adds nothing to the loss (padding, an unreadable shard)

# loop modes whose later loops read the embedding stream e (stage 0 of the pipeline keeps it)
READS_E = ("lt_i", "lt_ia", "flt", "flt_res")
# loop modes whose every layer reads h_{t-1} besides the stream (it travels the ring with x)
LAYERS_READ_H = ("flt", "flt_res")

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


class DeferredReadout(Protocol):
    """Logits not yet computed (train.loss_chunk_tokens): the readout state h and a way to
    rebind the same readout to another tensor holding h (the pipeline hands h over between
    pieces, never the logits)."""

    h: Tensor

    def on(self, h: Tensor) -> DeferredReadout: ...


class LoopedModel(Protocol):
    """The pieces of one forward pass, in the order the pipeline runs them on its stages:
    embed_stream (stage 0, once) -> per loop t: loop_input (stage 0) -> run_block (every
    stage, its slice of `block`) -> on the last stage norm, readout / no_readout, and handover
    to loop t + 1. Modules a stage does not own are None (or empty)."""

    cfg: object  # the model section of the config (hidden_size, loops, loop_mode, ...)
    layer_offset: int  # index of block[0] in the whole shared block
    embed: nn.Module | None
    prelude: nn.ModuleList
    block: nn.ModuleList  # the shared looped layers (each has .attn and .mlp)
    coda: nn.ModuleList
    norm: nn.Module | None
    lm_head: nn.Module | None
    gate: nn.Module | None

    def rope(self, positions: Tensor) -> Rope: ...

    def embed_stream(self, ids: Tensor, rope: Rope, store: KVStore) -> Tensor: ...

    def loop_input(self, t: int, e: Tensor | None,
                   h: Tensor | None) -> tuple[Tensor, Tensor | None]: ...

    def run_block(self, t: int, x: Tensor, h: Tensor | None, rope: Rope,
                  store: KVStore) -> Tensor: ...

    def readout(self, h: Tensor, t: int, rope: Rope,
                store: KVStore) -> tuple[Tensor | DeferredReadout | None, Tensor]: ...

    def no_readout(self, ids: Tensor) -> tuple[None, Tensor]: ...

    def stream_norm(self, x: Tensor) -> Tensor: ...

    def handover(self, x: Tensor, h: Tensor) -> Tensor: ...
