"""Held-out data: a fixed list of samples read in order, cut the same way under any layout.

Validation sample i is sample i of the held-out sources taken one after another, unshuffled.
A pass over n samples splits them into rounds of micro_batch x dp samples; in each round DP
rank r takes samples [r*mb, (r+1)*mb) of the round. The last round is padded with holes
(every label IGNORE_INDEX), so every layout scores exactly the same tokens and sums
(CE x tokens, tokens) reduce to the same numbers.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch

from data_pipeline.badinput import BadInput
from data_pipeline.loader import to_batch
from data_pipeline.stream import MISSING, ShardSource


class Samples(Protocol):
    samples_per_epoch: int

    def sample(self, index: int) -> np.ndarray: ...


class HeldOut:
    def __init__(self, sources: list[Samples], seq_len: int, names: list[str]):
        self.sources, self.seq_len, self.names = sources, seq_len, names
        self.total = sum(s.samples_per_epoch for s in sources)

    def sample(self, index: int) -> np.ndarray:
        for s in self.sources:
            if index < s.samples_per_epoch:
                return s.sample(index)
            index -= s.samples_per_epoch
        return np.full(self.seq_len + 1, MISSING, dtype=np.int32)  # padding: a hole

    def rank_batches(self, tokens: int, micro_batch: int, dp_rank: int,
                     dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This DP rank's micro-batches of a pass over min(tokens // seq_len, all) samples."""
        n = min(tokens // self.seq_len, self.total)
        rounds = math.ceil(n / (micro_batch * dp_size))
        out = []
        for k in range(rounds):
            first = (k * dp_size + dp_rank) * micro_batch
            rows = [self.sample(i) if i < n else self.sample(self.total)
                    for i in range(first, first + micro_batch)]
            out.append(to_batch(np.stack(rows).astype(np.int64)))
        return out


def shard_heldout(data, seq_len: int) -> HeldOut:
    """`data.validation` shard directories, in order (data: the data config section)."""
    bad = BadInput(data.on_error)
    sources = [ShardSource(s.path, seq_len, 0, i, False, data.shuffle_buffer, bad, s.url_template)
               for i, s in enumerate(data.validation)]
    return HeldOut(sources, seq_len, [s.path for s in data.validation])
