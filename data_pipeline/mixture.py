"""Deterministic weighted interleaving of sources with exact proportions over every window.

Within each window of `window` global samples, source i gets c_i samples, the largest-remainder
rounding of window * w_i / sum(w), spread evenly: the window's slots are ordered by
((k + 0.5) / c_i, i) for k < c_i. Global sample g therefore maps to (source, index within that
source) with no randomness at all; the shuffling happens inside each source.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.badinput import DataError


class Mixture:
    def __init__(self, weights: list[float], window: int):
        if not weights or any(w <= 0 for w in weights):
            raise DataError(f"data.sources: weights must be > 0, got {weights}")
        if window < len(weights):
            raise DataError(f"data.mixture_window: {window} is smaller than the {len(weights)} sources")
        share = np.asarray(weights, dtype=np.float64) / sum(weights) * window
        counts = np.floor(share).astype(np.int64)
        by_remainder = sorted(range(len(weights)), key=lambda i: (-(share[i] - counts[i]), i))
        for i in by_remainder[: window - int(counts.sum())]:
            counts[i] += 1
        slots = sorted(((k + 0.5) / c, i, k) for i, c in enumerate(counts) for k in range(c))
        self.window, self.counts = window, counts
        self.source = np.array([i for _, i, _ in slots], dtype=np.int64)
        self.ordinal = np.array([k for _, _, k in slots], dtype=np.int64)

    def locate(self, g: int) -> tuple[int, int]:
        """(source, index within the source) of global sample g."""
        w, pos = divmod(g, self.window)
        i = int(self.source[pos])
        return i, w * int(self.counts[i]) + int(self.ordinal[pos])
