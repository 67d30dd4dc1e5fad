"""Numeric flags checked where argparse parses them, so a bad value is the same one-line
error (exit 2) as every other bad input, naming the flag, instead of a traceback later."""

from __future__ import annotations

import argparse
import math


def at_least(low: float, kind: type = int):
    """An argparse `type`: a number of `kind` that is >= `low`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


def probability(text: str) -> float:
    """An argparse `type`: a float in (0, 1] (top-p, a fraction that keeps something)."""
    value = at_least(0.0, float)(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value
