"""How the multi-process checks compare a parallel tensor with the single-process one."""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist

from parallelism.topology import shutdown

# max |a - b| <= rtol max |b| + atol: relative to the tensor's scale, plus a floor for sums
# that cancel (a bias gradient summed over every token differs by ~1e-8 between summation
# orders in fp32, however small the sum itself is)
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-7


def adamw_reach(lr: float, beta1: float, beta2: float, steps: int) -> float:
    """The most AdamW moves one weight in `steps` steps at peak lr `lr` (weight decay aside):
    by Cauchy-Schwarz |m_hat / sqrt(v_hat)| at step t is at most
    (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2) * sum_{k<t} (b1^2 / b2)^k), whatever
    the gradients. Two layouts whose gradient of a weight sits at the rounding level of zero
    can move it in opposite directions: its weights may differ by twice this."""
    return lr * sum((1 - beta1) / (1 - beta1 ** t) * math.sqrt(
        (1 - beta2 ** t) / (1 - beta2) * sum((beta1 * beta1 / beta2) ** k for k in range(t)))
        for t in range(1, steps + 1))


def weights_match(got: torch.Tensor, want: torch.Tensor, reach: float) -> str | None:
    """Weights after AdamW steps under another layout: all but 0.1% of the elements at rtol
    1e-4 / atol 1e-5 (a wrong update or shard order fails in most of them), every element
    within twice AdamW's reach (`adamw_reach`). None, or what is wrong."""
    diff = (got - want).abs()
    off = (diff > 1e-5 + 1e-4 * want.abs()).float().mean().item()
    if off > 1e-3:
        return f"{off:.2%} of the elements differ"
    if diff.max().item() > 2 * reach:
        return f"an element differs by {diff.max().item():.3g} > 2 x AdamW's reach {reach:.3g}"
    return None


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def close_to(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= GRAD_RTOL * b.abs().max() + GRAD_ATOL)


def finish(topo, results, out: str) -> None:
    """Rank 0 writes the results as JSON; then every rank leaves the job."""
    if topo.rank == 0:
        with open(out, "w") as fh:
            json.dump(results, fh, indent=1)
    dist.barrier()
    shutdown(topo)


def assert_family_run(res: list[dict], steps: int) -> None:
    """A family's multi-process check (tests/test_family_plugin.py, tests/test_parcae.py):
    every rank's gradient cases close to one process's, and rank 0's `train*` cases -- the
    losses of `steps` trainer steps -- equal to one process's (means over every token: stage, TP and
    DP rounding stays ~1e-7)."""
    for rank, cases in enumerate(res):
        for case, r in cases.items():
            if case.startswith("train"):
                if rank == 0:
                    assert len(r["par"]) == steps, r
                    for a, b in zip(r["par"], r["ref"], strict=True):
                        assert abs(a - b) <= 1e-5 * abs(b), (rank, r)
                continue
            assert "config_error" not in r, r
            assert r["grad_close"], f"rank {rank} {case}: {r['grad_param']} {r['grad']}"
            if "loss" in r:
                assert r["loss"] < 1e-5, (rank, case)


def trainer_losses(topo, run: list[str], parallel: list[str]) -> dict:
    """A few trainer steps of the tiny config with `run` overrides, under this process's layout
    (`parallel`) and in one process: each step's loss, and the R each step ran (drawn R)."""
    from parallelism.topology import Topology
    from pretrain.train import Trainer
    from tests.conftest import tiny_config

    par = Trainer(tiny_config(*run, *parallel), topology=topo, log=lambda _: None,
                  tensorboard=False).fit(save=False)
    ref = Trainer(tiny_config(*run), topology=Topology(), log=lambda _: None,
                  tensorboard=False).fit(save=False)
    return {"par": [s["train/loss"] for s in par.history],
            "ref": [s["train/loss"] for s in ref.history],
            "loops": [s.get("train/loops") for s in ref.history]}
