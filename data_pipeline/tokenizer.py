"""Hugging Face `tokenizers`: train a byte-level BPE offline, load one, fingerprint it.

The fingerprint (sha256 of the tokenizer's canonical JSON) goes into every shard manifest, so a
run cannot mix shards made by one tokenizer with a model trained on another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_pipeline.badinput import DataError

EOS_TOKEN = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int, out: str | Path,
              eos_token: str = EOS_TOKEN) -> Tokenizer:
    """Byte-level BPE with `eos_token` as its first special token (id 0)."""
    if vocab_size < 257 + 1:
        raise DataError(f"--vocab-size: a byte-level BPE needs at least 258 ids, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    return tok


def _byte_chars() -> list[str]:
    """The printable character byte-level tokenizers show for each byte 0..255: the byte's own
    character where it is printable Latin-1, else chr(256 + n) in byte order (GPT-2's table,
    which `pre_tokenizers.ByteLevel` applies)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
            *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_tokenizer(eos_token: str = EOS_TOKEN) -> Tokenizer:
    """Our byte-level ids (a UTF-8 byte b is id b, EOS 256: pretrain/data.py `ByteTokenizer`)
    as a `tokenizers` file, so a byte-level model exports a tokenizer transformers loads."""
    vocab = {c: b for b, c in enumerate(_byte_chars())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([eos_token])
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(p))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"{p}: not a tokenizer.json ({str(e).splitlines()[0]})") from None


def tokenizer_hash(tok: Tokenizer) -> str:
    return hashlib.sha256(tok.to_str().encode()).hexdigest()


def eos_id(tok: Tokenizer, eos_token: str = EOS_TOKEN) -> int:
    i = tok.token_to_id(eos_token)
    if i is None:
        raise DataError(f"tokenizer has no EOS token {eos_token!r} (pass --eos-token)")
    return i
