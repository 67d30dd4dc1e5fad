"""In-memory token source for single-process training on small text files (tiny runs, the demo).

Order is a pure function of (seed, global sample index): sample i is window perm_e[i mod n] of
epoch e = i // n, where perm_e is a permutation seeded by (seed, e). A run resumed at step k, or
run with another batch split, sees the same samples. The streaming webdataset pipeline lives in
`data_pipeline/`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from core.config_schema import ConfigError
from data_pipeline.loader import RankSpec, StreamingData
from data_pipeline.validation import HeldOut, shard_heldout


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255 and EOS = 256: no files, no network, any text round-trips."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


def load_text_tokens(paths: list[str], tokenizer: ByteTokenizer,
                     fields: list[str] | None = None) -> Tensor:
    """Each file is one document followed by EOS. Errors name the config field (`fields`,
    default data.paths[i]) and the file."""
    ids: list[int] = []
    for i, path in enumerate(paths):
        p = Path(path)
        where = fields[i] if fields else f"data.paths[{i}]"
        if not p.is_file():
            raise ConfigError(f"{where}: file not found: {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: {p} is not UTF-8 text (byte {e.start})") from None
        if not text.strip():
            raise ConfigError(f"{where}: {p} is empty")
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    return torch.tensor(ids, dtype=torch.long)


class TokenWindows:
    """Non-overlapping (seq_len + 1)-token windows of a token stream, shuffled per epoch."""

    def __init__(self, tokens: Tensor, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.num_windows = (len(tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ConfigError(f"train.seq_len: {seq_len} needs more than the {len(tokens)} "
                              "tokens the data provides")
        self._perm: tuple[int, Tensor] | None = None

    def _order(self, epoch: int) -> Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.num_windows, generator=g))
        return self._perm[1]

    def sample(self, index: int) -> Tensor:
        epoch, j = divmod(index, self.num_windows)
        start = int(self._order(epoch)[j]) * self.seq_len
        return self.tokens[start : start + self.seq_len + 1]

    def batch(self, first: int, size: int) -> tuple[Tensor, Tensor]:
        """Samples first..first+size-1 as (input_ids, labels), each [size, seq_len]."""
        rows = torch.stack([self.sample(first + k) for k in range(size)])
        return rows[:, :-1], rows[:, 1:]


class TextData:
    """The trainer's view of a `TokenWindows` source, with the streaming loader's protocol
    (`batches()`, `state_dict()`, `skipped_samples`) and its rank split (`RankSpec`)."""

    skipped_samples = 0

    def __init__(self, windows: TokenWindows, spec: RankSpec):
        self.windows, self.spec = windows, spec
        self.samples_consumed = 0

    def batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, k = self.samples_consumed, 0
        while True:
            rows = self.spec.samples(start, k)
            k += 1
            if k % self.spec.grad_accum_steps == 0:
                self.samples_consumed += self.spec.global_batch
            yield self.windows.batch(rows.start, len(rows))

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed}

    def load_state_dict(self, state: dict) -> None:
        self.samples_consumed = state["samples_consumed"]


class TextSamples:
    """Windows of a token stream in order, unshuffled: held-out text (data.validation)."""

    def __init__(self, tokens: Tensor, seq_len: int):
        self.tokens, self.seq_len = tokens, seq_len
        self.samples_per_epoch = (len(tokens) - 1) // seq_len

    def sample(self, index: int):
        start = index * self.seq_len
        return self.tokens[start:start + self.seq_len + 1].numpy()


def default_data(cfg, topo=None):
    """The configured training data for this data-parallel rank (topo: its Topology; None: one
    process): bundled-text windows, or the streaming shard loader."""
    dp_rank, dp = (topo.dp_rank, topo.dp) if topo is not None else (0, 1)
    if cfg.data.source == "shards":
        return StreamingData(cfg, dp_rank, dp)
    spec = RankSpec(cfg.train.micro_batch_size, cfg.train.grad_accum_steps, dp_rank, dp)
    windows = TokenWindows(load_text_tokens(cfg.data.paths, _byte_tokenizer(cfg)),
                           cfg.train.seq_len, cfg.train.seed)
    return TextData(windows, spec)


def heldout_data(cfg) -> HeldOut | None:
    """`data.validation` as held-out samples in order; None when none is configured."""
    d, seq_len = cfg.data, cfg.train.seq_len
    if not d.validation:
        return None
    if d.source == "shards":
        return shard_heldout(d, seq_len)
    tok = _byte_tokenizer(cfg)
    sources = [TextSamples(load_text_tokens([s.path], tok, [f"data.validation[{i}].path"]), seq_len)
               for i, s in enumerate(d.validation)]
    return HeldOut(sources, seq_len, [s.path for s in d.validation])


def _byte_tokenizer(cfg) -> ByteTokenizer:
    tokenizer = ByteTokenizer()
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the byte "
                          f"tokenizer's {tokenizer.vocab_size}")
    return tokenizer
