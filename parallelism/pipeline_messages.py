"""The ring's point-to-point messages in one order that every pair of ranks agrees on.

NCCL pairs a send with a receive by issue order on each pair of ranks (torch: "tag is not
supported with the NCCL backend"), and a pair's sends and receives in both directions share
one stream, so the two ends must issue that pair's operations in the same sequence or the
pipeline pairs the wrong tensors or hangs. Megatron's p2p_communication reaches this by
lockstep batches; the circular pipeline's pieces do not line up across ranks in lockstep
(R laps, a sampled R, forward-only laps), so the order is derived instead: every rank replays
the step's schedule of *every* rank (the schedules are pure functions of the plan) in rounds
-- each rank runs its next piece once the message it waits for has been sent -- and the
replay's global sequence of messages fixes, for each rank, when it posts each receive relative
to its own pieces. Each rank's operations are then a subsequence of one global order, so every
pair issues its operations in the same order, and a blocking wait only ever waits for a send
that comes earlier in that order: no pair mismatch, no cycle. Tags are never used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from parallelism.pipeline_schedule import Piece


class Action(NamedTuple):
    kind: str  # "recv": post the receive of `piece`'s message; "run": run `piece` (and send)
    piece: Piece


@dataclass(frozen=True)
class Ring:
    """Which pieces exchange messages in a step of `stages` ranks, `loops` laps, the first
    `grad_from` of them forward only."""

    stages: int
    loops: int
    grad_from: int = 0

    def receives(self, rank: int, piece: Piece) -> bool:
        """Whether `piece` on pipeline rank `rank` waits for a message (its input, or the
        gradient of its output)."""
        if piece.kind == "F":
            return not (rank == 0 and piece.lap == 0)
        return not (rank == self.stages - 1 and piece.lap == self.loops - 1)

    def sends_to(self, rank: int, piece: Piece) -> tuple[int, Piece] | None:
        """The (rank, piece) that `piece` on `rank` sends its output (F) or its input's
        gradient (B) to; the last stage hands lap t to stage 0's lap t + 1."""
        last = self.stages - 1
        if piece.kind == "F":
            if rank == last and piece.lap == self.loops - 1:
                return None
            return (rank + 1) % self.stages, Piece("F", piece.mb, piece.lap + (rank == last))
        if rank == 0 and piece.lap == self.grad_from:  # its input came without a graph
            return None
        return (rank - 1) % self.stages, Piece("B", piece.mb, piece.lap - (rank == 0))

    def actions(self, pieces: Sequence[Sequence[Piece]]) -> list[list[Action]]:
        """Each rank's actions in the global order; `pieces[r]` is rank r's schedule."""
        ranks = len(pieces)
        actions: list[list[Action]] = [[] for _ in range(ranks)]
        sent: set[tuple[int, Piece]] = set()
        at = [0] * ranks
        while any(at[r] < len(pieces[r]) for r in range(ranks)):
            moved = False
            for r in range(ranks):  # one round: each rank runs at most one piece
                if at[r] == len(pieces[r]):
                    continue
                piece = pieces[r][at[r]]
                if self.receives(r, piece) and (r, piece) not in sent:
                    continue
                actions[r].append(Action("run", piece))
                at[r] += 1
                moved = True
                dest = self.sends_to(r, piece)
                if dest is not None:
                    sent.add(dest)
                    actions[dest[0]].append(Action("recv", dest[1]))
            if not moved:
                stuck = {r: pieces[r][at[r]] for r in range(ranks) if at[r] < len(pieces[r])}
                raise RuntimeError(f"pipeline schedule cannot proceed: each rank waits for a "
                                   f"message never sent ({stuck})")
        return actions
