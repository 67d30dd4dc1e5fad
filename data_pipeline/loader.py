"""Streaming loader: this data-parallel rank's micro-batches, with global, layout-free state.

Global batch s holds global samples [s*G, (s+1)*G), G = micro_batch * grad_accum * dp_size.
Rank r takes the contiguous slice [s*G + r*G/dp, s*G + (r+1)*G/dp), cut into grad_accum
micro-batches; DataLoader worker w of a rank builds that rank's micro-batches w, w+W, w+2W, ...
(the DataLoader hands them back round-robin, i.e. in order). So what a global batch contains
depends only on (seed, global sample index): not on dp_size, not on the number of workers.
The state is one number, `samples_consumed` (OLMo-core style), valid under any layout.

Read cost: every worker streams every shard it needs and keeps its own samples; with tar
streams there is no cheaper way to honour a layout-free order, and tokens are cheap to read
(bench/data_throughput.py).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.model_interface import IGNORE_INDEX
from data_pipeline.badinput import BadInput, DataError
from data_pipeline.mixture import Mixture
from data_pipeline.stream import MISSING, ShardSource
from data_pipeline.tokenizer import load_tokenizer, tokenizer_hash


@dataclass(frozen=True)
class RankSpec:
    micro_batch_size: int
    grad_accum_steps: int
    dp_rank: int = 0
    dp_size: int = 1

    @property
    def per_rank(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps

    @property
    def global_batch(self) -> int:
        return self.per_rank * self.dp_size

    def samples(self, start: int, k: int) -> range:
        """Global sample indices of this rank's k-th micro-batch counted from sample `start`."""
        step, micro = divmod(k, self.grad_accum_steps)
        first = (start + step * self.global_batch + self.dp_rank * self.per_rank
                 + micro * self.micro_batch_size)
        return range(first, first + self.micro_batch_size)


def open_sources(data, seq_len: int, seed: int, bad: BadInput) -> tuple[list[ShardSource], Mixture]:
    sources = [ShardSource(s.path, seq_len, seed, i, data.shuffle, data.shuffle_buffer, bad,
                           s.url_template) for i, s in enumerate(data.sources)]
    return sources, Mixture([s.weight for s in data.sources], data.mixture_window)


class RankBatches(IterableDataset):
    """Endless micro-batches (input_ids, labels) of one rank from global sample `start` on."""

    def __init__(self, data, seq_len: int, seed: int, spec: RankSpec, start: int):
        self.data, self.seq_len, self.seed, self.spec, self.start = data, seq_len, seed, spec, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor] | str]:
        """Yields micro-batches; a DataError ends the stream with its message instead."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        sources, mixture = open_sources(self.data, self.seq_len, self.seed,
                                        BadInput(self.data.on_error))
        k = worker
        while True:
            try:
                rows = [sources[i].sample(idx) for i, idx in
                        map(mixture.locate, self.spec.samples(self.start, k))]
            except DataError as e:  # handed to the main process as a message: one clean line
                yield str(e)
                return
            yield to_batch(np.stack(rows))
            k += workers


def _ignore_preemption_signals(_worker: int) -> None:
    """SLURM signals every process of a job step; the trainer (the workers' parent) turns
    SIGTERM/SIGUSR1 into a checkpoint at the step's end and then stops the workers itself, so
    a worker must not die of the signal first. Forked workers inherit the trainer's handler;
    spawned / forkserver ones (Python 3.14's default) would not, hence explicit."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def to_batch(rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows [B, L+1] -> (inputs, labels) [B, L]; a window with MISSING tokens is a hole:
    all of its labels are IGNORE_INDEX, so it adds nothing to the loss."""
    t = torch.from_numpy(rows.astype(np.int64))
    holes = (t == MISSING).any(1)
    inputs, labels = t[:, :-1].clamp_min(0), t[:, 1:].clone()
    labels[holes] = IGNORE_INDEX
    return inputs, labels


class StreamingData:
    """What the trainer consumes: `batches()` from the current state, `state_dict()`."""

    def __init__(self, cfg, dp_rank: int = 0, dp_size: int = 1):
        d, t = cfg.data, cfg.train
        self.data, self.seq_len, self.seed = d, t.seq_len, t.seed
        self.spec = RankSpec(t.micro_batch_size, t.grad_accum_steps, dp_rank, dp_size)
        sources, _ = open_sources(d, t.seq_len, t.seed, BadInput(d.on_error))
        self.manifests = [s.manifest for s in sources]
        hashes = {m.tokenizer_sha256 for m in self.manifests}
        if len(hashes) > 1:
            raise DataError("data.sources: shards were made by different tokenizers "
                            f"({', '.join(s.path for s in d.sources)})")
        if d.tokenizer:
            want = tokenizer_hash(load_tokenizer(d.tokenizer))
            for src, m in zip(d.sources, self.manifests, strict=True):
                if m.tokenizer_sha256 != want:
                    raise DataError(f"{src.path}: manifest tokenizer hash {m.tokenizer_sha256[:12]} "
                                    f"does not match data.tokenizer {d.tokenizer} ({want[:12]})")
        for src, m in zip(d.sources, self.manifests, strict=True):
            if m.vocab_size > cfg.model.vocab_size:
                raise DataError(f"{src.path}: vocabulary of {m.vocab_size} exceeds "
                                f"model.vocab_size {cfg.model.vocab_size}")
        self.samples_consumed = 0
        self.skipped_samples = 0

    def fingerprint(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "shuffle": self.data.shuffle,
                "shuffle_buffer": self.data.shuffle_buffer,
                "mixture_window": self.data.mixture_window,
                "sources": [{"weight": s.weight, "tokens": m.total_tokens,
                             "tokenizer": m.tokenizer_sha256}
                            for s, m in zip(self.data.sources, self.manifests, strict=True)]}

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "skipped_samples": self.skipped_samples,
                "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.fingerprint()
        for key, value in state["fingerprint"].items():
            if mine.get(key) != value:
                raise DataError(f"data state: {key!r} differs from the checkpoint's "
                                f"({mine.get(key)!r} now, {value!r} then)")
        if state["samples_consumed"] % self.spec.global_batch:
            raise DataError(f"data state: {state['samples_consumed']} consumed samples is not a "
                            f"multiple of the global batch {self.spec.global_batch}")
        self.samples_consumed = state["samples_consumed"]
        self.skipped_samples = state["skipped_samples"]

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches from `samples_consumed` on; the state advances by one
        global batch after every grad_accum micro-batches."""
        dataset = RankBatches(self.data, self.seq_len, self.seed, self.spec, self.samples_consumed)
        workers = self.data.num_workers
        loader = DataLoader(dataset, batch_size=None, num_workers=workers,
                            prefetch_factor=self.data.prefetch if workers else None,
                            worker_init_fn=_ignore_preemption_signals if workers else None)
        for k, item in enumerate(loader, start=1):
            if isinstance(item, str):
                raise DataError(item)
            inputs, labels = item
            self.skipped_samples += int((labels == IGNORE_INDEX).all(1).sum())
            if k % self.spec.grad_accum_steps == 0:
                self.samples_consumed += self.spec.global_batch
            yield inputs, labels
