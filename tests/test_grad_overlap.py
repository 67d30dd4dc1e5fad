"""Data-parallel gradient reduction overlapped with backward (parallelism/grad_overlap.py)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

from parallelism.grad_overlap import OverlappedGradReducer
from pretrain.cli import main
from tests.conftest import ROOT
from tests.distributed import free_port, torchrun


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4], ids=["dp2", "pp2xdp2"])
def test_overlapped_reduction_is_bit_identical(world, tmp_path):
    """DP = 2 (and PP = 2 x DP = 2, where the shared block's gradient is complete only after
    its last lap): every bucket leaves during backward from the second step on, and the
    weights and losses equal the run that reduces after backward, bit for bit."""
    out = tmp_path / "overlap.json"
    torchrun(world, "-m", "tests.multiproc.overlap_equivalence", "--out", str(out))
    for case, r in json.loads(out.read_text()).items():
        assert r["losses_equal"] and r["weights_equal"], case
        assert r["during_backward"] == [0] + [r["buckets"]] * 3, case  # step 1 counts
        assert r["buckets"] > 1, case


def test_a_changed_schedule_raises_instead_of_reducing_a_stale_gradient():
    """A contribution after its bucket went out (the backward schedule changed between steps)
    is an error, not a silently stale average."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1)
    model = nn.Linear(4, 4)
    reducer = OverlappedGradReducer(model, dist.group.WORLD, 1, bucket_mb=1.0)
    x = torch.randn(3, 4)
    model(x).sum().backward()  # step 1: counts one contribution per parameter
    reducer.finish()
    model.zero_grad(set_to_none=True)
    model(x).sum().backward()  # the bucket leaves here
    with pytest.raises(RuntimeError, match="arrived after its bucket was reduced"):
        model(x).sum().backward()  # a second micro-batch the first step did not have


def test_bad_bucket_size(capsys):
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"),
                 "parallel.grad_bucket_mb=0"]) == 2
    assert "parallel.grad_bucket_mb: must be > 0, got 0" in capsys.readouterr().err
