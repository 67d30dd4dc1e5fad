"""The metrics registry (parallelism/stats.py): how each name reduces over ranks."""

from __future__ import annotations

import pytest
import torch

from parallelism.stats import Metrics
from parallelism.topology import Topology


def _record(m: Metrics, last_stage: bool, loss: float, memory: float, skips: int) -> None:
    m.record("train/loss", loss if last_stage else None)  # mean
    m.record("loop/ce_step", torch.tensor([loss, loss / 2]) if last_stage else None,
             shape=(2,), steps=True)
    m.record("data/skipped_samples", skips if last_stage else None, "sum")
    m.record("train/peak_memory_gb", memory, "max")
    m.record("train/free_memory_gb", 100 - memory, "min")


def test_each_name_reduces_as_recorded_over_tp_pp_dp():
    """8 ranks, TP 2 x PP 2 x DP 2: the last stage's TP rank 0 of each replica holds the loss
    (its TP peer a copy, which must not count twice), every rank its own memory."""
    rows, metrics = [], None
    for dp in range(2):
        for pp in range(2):
            for tp in range(2):
                m = Metrics()
                _record(m, pp == 1, loss=1.0 + dp, memory=10 * dp + 4 * pp + tp, skips=3 + dp)
                rows.append(m.local(Topology(world=8, tp=2, pp=2, dp=2, tp_rank=tp, pp_rank=pp,
                                             dp_rank=dp)))
                metrics = m
    named = metrics.named(metrics.combine(torch.stack(rows)))
    assert named == {"train/loss": 1.5, "loop/ce_step1": 1.5, "loop/ce_step2": 0.75,
                     "data/skipped_samples": 7.0, "train/peak_memory_gb": 15.0,
                     "train/free_memory_gb": 85.0}


def test_one_process_logs_its_own_values():
    m = Metrics()
    _record(m, True, loss=2.0, memory=1.5, skips=0)
    assert m.named(m.reduce(Topology())) == {
        "train/loss": 2.0, "loop/ce_step1": 2.0, "loop/ce_step2": 1.0,
        "data/skipped_samples": 0.0, "train/peak_memory_gb": 1.5, "train/free_memory_gb": 98.5}


def test_an_unknown_reduction_is_refused():
    with pytest.raises(ValueError, match="reduction 'median' is not one of"):
        Metrics().record("x", 1.0, "median")
