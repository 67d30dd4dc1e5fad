"""Text <-> ids for a run: its tokenizer (`data.tokenizer`, a tokenizers JSON) or UTF-8 bytes
(pretrain/data.py `ByteTokenizer`, when no tokenizer is configured), with what evaluation needs
beyond encode/decode: the EOS id, how many bytes of text each id stands for, and when generated
text is finished (EOS or a stop string, as lm-eval's generate_until decides).

Bits per byte is the tokenizer-independent loss (the FLT paper's and nanochat's bpb): the
summed CE in nats over tokens that stand for text, divided by ln 2 x the bytes they stand for.
Special tokens (EOS) stand for no bytes and are left out of both sums, as nanochat does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class TextCodec:
    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    eos_id: int
    byte_lengths: Tensor  # [ids] bytes of text each id stands for (0: special tokens)

    @classmethod
    def of(cls, tokenizer_path: str) -> TextCodec:
        """The codec of a run's `data.tokenizer` ("" : UTF-8 bytes)."""
        if not tokenizer_path:
            from pretrain.data import ByteTokenizer

            byte = ByteTokenizer()
            lengths = torch.ones(byte.vocab_size, dtype=torch.long)
            lengths[byte.eos_id] = 0
            return cls(byte.encode, byte.decode, byte.eos_id, lengths)
        from data_pipeline.tokenizer import eos_id, load_tokenizer

        tok = load_tokenizer(tokenizer_path)
        return cls(lambda s: tok.encode(s, add_special_tokens=False).ids,
                   lambda ids: tok.decode(list(ids)), eos_id(tok), _byte_lengths(tok))

    def bytes_of(self, ids: Tensor) -> Tensor:
        """Bytes of text each id stands for (ids outside the table, e.g. ignored labels or
        vocabulary padding, stand for none)."""
        table = self.byte_lengths.to(ids.device)
        inside = (ids >= 0) & (ids < table.numel())
        return torch.where(inside, table[ids.clamp(0, table.numel() - 1)], 0)

    def finished(self, ids: list[int], until: Sequence[str] = ()) -> bool:
        """New ids hold EOS or decode to text containing one of `until`: the rule lm-eval's
        generate_until stops at."""
        return self.eos_id in ids or any(s and s in self.decode(ids) for s in until)

    def answer_length(self, ids: list[int], until: Sequence[str] = ()) -> int:
        """How many of the new `ids` a sequence decoded on its own would have produced."""
        return next((k for k in range(1, len(ids)) if self.finished(ids[:k], until)), len(ids))

    def stop_when(self, until: Sequence[str] = ()) -> Callable[[Tensor], bool]:
        """For `generate(stop=)`: True once every sequence's new ids [B, k] are `finished`."""
        return lambda new: all(self.finished(row, until) for row in new.tolist())


def _byte_lengths(tok) -> Tensor:
    """A byte-level BPE token's string spells one character per byte (GPT-2's byte alphabet),
    so its length is its byte count; other tokenizers: the UTF-8 length of the id decoded
    alone. Added special tokens stand for no text."""
    from tokenizers import decoders

    special = {i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    byte_level = isinstance(tok.decoder, decoders.ByteLevel)
    lengths = []
    for i in range(tok.get_vocab_size()):
        if i in special:
            lengths.append(0)
        elif byte_level:
            lengths.append(len(tok.id_to_token(i) or ""))
        else:
            lengths.append(len(tok.decode([i]).encode("utf-8")))
    return torch.tensor(lengths, dtype=torch.long)


def bits_per_byte(nats: float, n_bytes: float) -> float:
    return nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
