"""The bad-input policy shared by tokenisation and loading: raise a named error, or count a skip.

`on_error: raise` (default) stops with one line naming the file/shard and where in it;
`on_error: skip` logs the same line as a warning and counts it, so nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Literal

log = logging.getLogger("data_pipeline")

Policy = Literal["raise", "skip"]


class DataError(ValueError):
    """Bad input data; the message names the file or shard and the offset."""


class BadInput:
    def __init__(self, policy: Policy = "raise"):
        if policy not in ("raise", "skip"):
            raise DataError(f"data.on_error: expected 'raise' or 'skip', got {policy!r}")
        self.policy = policy
        self.counts: Counter[str] = Counter()
        self.source = ""  # the input being read: counts are kept per input too
        self.by_input: dict[str, Counter[str]] = {}

    def __call__(self, kind: str, message: str, amount: int = 1) -> None:
        """Report `amount` units of bad input of `kind` (e.g. 'documents', 'samples')."""
        if self.policy == "raise":
            raise DataError(message)
        self.count(kind, amount)
        log.warning("skipped %d %s: %s", amount, kind, message)

    def count(self, kind: str, amount: int = 1) -> None:
        """Count a skip that is no error (e.g. an empty document) without a warning."""
        self.counts[kind] += amount
        self.by_input.setdefault(self.source, Counter())[kind] += amount
