"""What training keeps for the backward: activation recompute and the deferred (chunked) LM head.

A looped model at R loops is R times as deep as its block, and every loop step has a readout:
without these, a 2.6B model's unrolled 192 layers and its R logits tensors [S, B, V] decide
whether it fits. Both are policies applied to an unchanged function -- the recomputed forward
runs the same operations, so gradients are bit-equal (fp32, CPU; tests/test_memory.py).

Recompute (`train.recompute`, torch's non-reentrant checkpoint): it restores the default CPU
and CUDA generators before recomputing, and dropout here draws from them (no megatron RNG
tracker), so the recomputed masks are the first ones, under TP too.
  none       keep every activation
  selective  recompute the attention core only (Korthikanti et al. 2022: scores, softmax and
             the weighted sum are most of the bytes and few of the FLOPs)
  full       keep only each layer's input, recompute the layer in backward
  loops      `full` for the layers of loops 1..R-k, nothing recomputed for the last k =
             `train.recompute_keep_last_loops` (the FLT authors' `activation_offload`: the
             cheapest trade for a looped model, whose last loops' backward runs first)

Deferred readout (`train.loss_chunk_tokens` > 0, training only): the model hands the objective
a `DeferredLogits` -- the normed state h_t and the head -- instead of logits; the per-token CE
is computed chunk by chunk of the sequence, each chunk's logits recomputed in backward, so only
the [S, B] CE and h_t outlive a chunk (the FLT code checkpoints each step's head + loss alike).
Under sequence parallelism h holds a slice of the sequence on each TP rank and the head gathers
it: a chunk of the local rows is the same rows of every rank's slice, which `seq_shards` tells.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class MemoryPolicy:
    recompute: str = "none"
    keep_last_loops: int = 0  # `loops` mode: the last k loops keep their activations
    chunk_rows: int = 0  # rows of each sequence shard per chunk of the deferred readout; 0: off
    seq_shards: int = 1  # TP ranks sharing the sequence (sequence parallelism), else 1

    @classmethod
    def of(cls, train, seq_shards: int = 1) -> MemoryPolicy:
        """From the train section (recompute, recompute_keep_last_loops, loss_chunk_tokens);
        a chunk of loss_chunk_tokens tokens is that many / seq_shards rows of each shard."""
        return cls(train.recompute, train.recompute_keep_last_loops,
                   -(-train.loss_chunk_tokens // seq_shards), seq_shards)

    def recomputes_layer(self, loop: int, loops: int) -> bool:
        """Whether the block's layers on loop `loop` (0-based) of `loops` are recomputed."""
        if self.recompute == "full":
            return True
        return self.recompute == "loops" and loop < loops - self.keep_last_loops


class SavedForBackward:
    """Counts the distinct bytes backward will read, exactly: every tensor autograd saves
    (torch.autograd.graph.saved_tensors_hooks) and the inputs a recomputed region keeps,
    one count per storage, `exclude`d storages (the weights) left out."""

    def __init__(self, exclude=()):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def count(self, t: Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() and storage.data_ptr() not in self.exclude:
            self.storages[storage.data_ptr()] = storage.nbytes()

    def _pack(self, t: Tensor) -> Tensor:
        self.count(t)
        return t

    def __enter__(self) -> SavedForBackward:
        self._hooks.__enter__()
        _COUNTERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        _COUNTERS.remove(self)
        self._hooks.__exit__(*exc)


_COUNTERS: list[SavedForBackward] = []  # open counters, told what recomputed regions keep


def plain(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs): the no-recompute counterpart of `recomputed`."""
    return fn(*args, **kwargs)


def recomputed(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs), its activations recomputed in backward (inputs kept only); plain
    call where no gradient is taken."""
    if not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    for counter in _COUNTERS:
        for a in (*args, *kwargs.values()):
            if isinstance(a, Tensor):
                counter.count(a)
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


class DeferredLogits:
    """The logits head(h) of one loop step, not computed: `cross_entropy` evaluates them a
    sequence chunk at a time. `h` [S/seq_shards, B, H]; head(h) -> logits [S, B, V'] (V' the
    vocab shard under TP)."""

    def __init__(self, h: Tensor, head: Callable[[Tensor], Tensor], chunk_rows: int,
                 seq_shards: int = 1):
        self.h, self.head, self.chunk_rows, self.seq_shards = h, head, chunk_rows, seq_shards

    def on(self, h: Tensor) -> DeferredLogits:
        """The same readout of another tensor holding h (the pipeline's hand-off leaf)."""
        return DeferredLogits(h, self.head, self.chunk_rows, self.seq_shards)

    def materialize(self) -> Tensor:
        return self.head(self.h)

    def cross_entropy(self, labels: Tensor, token_ce: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """token_ce(head(h), labels) per token [S, B], chunk by chunk; labels [S, B]."""
        rows, shards = self.h.shape[0], self.seq_shards
        by_shard = labels.view(shards, rows, labels.shape[1])  # row r of shard k: k*rows + r
        pieces = []
        for start in range(0, rows, self.chunk_rows):
            stop = min(start + self.chunk_rows, rows)
            lab = by_shard[:, start:stop].reshape(-1, labels.shape[1])
            ce = recomputed(self._chunk_ce, self.h[start:stop], lab, token_ce)
            pieces.append(ce.view(shards, stop - start, -1))
        return torch.cat(pieces, dim=1).view_as(labels)

    def _chunk_ce(self, h: Tensor, labels: Tensor, token_ce) -> Tensor:
        return token_ce(self.head(h), labels)
