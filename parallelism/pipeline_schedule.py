"""Pipeline schedules over the R laps of the looped block: the order of forward and backward
pieces on each rank.

A piece is (F|B, microbatch, lap). Lap t on pipeline rank k is virtual stage t*P + k, and the
virtual stages form a chain that wraps around the ring of ranks (lap t on the last rank feeds
lap t + 1 on rank 0), so the laps act as Megatron's interleaved model chunks -- except that all
chunks of a rank share one set of weights.

interleaved 1F1B: microbatches go in groups of P; within a group every lap's forward runs for
    the P microbatches before the next lap (backwards: laps in reverse). Rank k runs
    (P - k - 1) * 2 + (R - 1) * P warm-up forwards (P - k - 1 when R = 1), then alternates one
    forward and one backward, then drains. Pieces alive at once on a rank: at most warm-up + 1,
    independent of the number of microbatches m. Needs m % P == 0 when R > 1.
gpipe: every forward, then every backward (reference and debugging; m * R pieces alive).
"""

from __future__ import annotations

from typing import NamedTuple


class Piece(NamedTuple):
    kind: str  # "F" or "B"
    mb: int
    lap: int


def _order(i: int, stages: int, loops: int, backward: bool) -> tuple[int, int]:
    group, rest = divmod(i, stages * loops)
    lap, j = divmod(rest, stages)
    return group * stages + j, (loops - 1 - lap if backward else lap)


def warmup_count(stages: int, loops: int, microbatches: int, rank: int) -> int:
    if loops == 1:
        n = stages - rank - 1
    else:
        n = (stages - rank - 1) * 2 + (loops - 1) * stages
    return min(n, microbatches * loops)


def schedule(kind: str, stages: int, loops: int, microbatches: int, rank: int) -> list[Piece]:
    total = microbatches * loops
    if loops > 1 and microbatches < stages:
        # groups of P microbatches: with fewer, run the ordering over a partial group
        order = [(mb, lap) for lap in range(loops) for mb in range(microbatches)]
        fwd = [Piece("F", mb, lap) for mb, lap in order]
        bwd = [Piece("B", mb, loops - 1 - lap) for mb, lap in order]
    else:
        fwd = [Piece("F", *_order(i, stages, loops, False)) for i in range(total)]
        bwd = [Piece("B", *_order(i, stages, loops, True)) for i in range(total)]
    if kind == "gpipe":
        return fwd + bwd
    warm = warmup_count(stages, loops, microbatches, rank)
    pieces = fwd[:warm]
    for i in range(total - warm):
        pieces += [fwd[warm + i], bwd[i]]
    return pieces + bwd[total - warm:]


def peak_live(pieces: list[Piece]) -> int:
    """Most pieces forwarded but not yet backwarded at any time (stashed activations)."""
    live = peak = 0
    for p in pieces:
        live += 1 if p.kind == "F" else -1
        peak = max(peak, live)
    return peak
