from __future__ import annotations

import math

import pytest
import torch

from pretrain.config import ObjectiveConfig
from pretrain.model.looped import LoopedOutput
from pretrain.model.objective import (
    IGNORE_INDEX,
    adaptive_gate_loss,
    compute_objective,
    elbo_per_token,
    exit_log_probs,
)


@pytest.mark.parametrize("loops", [1, 2, 5])
def test_exit_distribution_sums_to_one(loops):
    g = torch.randn(loops, 3, 7) * 4
    p = exit_log_probs(g).exp()
    torch.testing.assert_close(p.sum(0), torch.ones(3, 7))
    assert (p >= 0).all()


def test_exit_distribution_by_hand():
    lam = torch.tensor([0.2, 0.5, 0.9])
    p = exit_log_probs(torch.logit(lam)[:, None, None]).exp().flatten()
    torch.testing.assert_close(p, torch.tensor([0.2, 0.8 * 0.5, 0.8 * 0.5]))


def test_saturated_gates_select_one_step():
    ce = torch.rand(4, 2, 5) * 3
    never = torch.full((4, 2, 5), -1e4)  # lambda == 0: always run all loops
    always = torch.full((4, 2, 5), 1e4)  # lambda == 1: exit after the first
    for beta in (0.0, 0.1):
        torch.testing.assert_close(elbo_per_token(ce, never, beta), ce[-1])
        torch.testing.assert_close(elbo_per_token(ce, always, beta), ce[0])


def test_elbo_by_hand():
    ce = torch.tensor([1.0, 2.0, 3.0])[:, None, None]
    g = torch.zeros(3, 1, 1)  # lambda = 0.5 -> p = (0.5, 0.25, 0.25)
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    want = 0.5 * 1 + 0.25 * 2 + 0.25 * 3 - 0.1 * entropy
    assert elbo_per_token(ce, g, 0.1).item() == pytest.approx(want, rel=1e-6)


def test_elbo_gradcheck():
    ce = torch.rand(3, 2, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, x: elbo_per_token(c, x, 0.1), (ce, g))


def test_compute_objective_masks_ignored_tokens_and_reports_stats():
    torch.manual_seed(0)
    logits = [torch.randn(6, 2, 11) for _ in range(3)]  # [S, B, V]
    labels = torch.randint(0, 11, (2, 6))  # [B, S]
    labels[1, 3:] = IGNORE_INDEX
    out = compute_objective(ObjectiveConfig(), LoopedOutput(logits, torch.randn(3, 6, 2)), labels)
    keep = labels != IGNORE_INDEX
    want_ce = [torch.nn.functional.cross_entropy(lg.transpose(0, 1)[keep], labels[keep]).item()
               for lg in logits]
    assert out.ce.tolist() == pytest.approx(want_ce, rel=1e-5)
    assert out.exit_prob.sum().item() == pytest.approx(1.0, rel=1e-6)
    assert 1.0 <= out.expected_loops.item() <= 3.0
    assert out.tokens.item() == keep.sum().item()


def test_adaptive_gate_targets_follow_improvement():
    """Where another loop lowers CE a lot the gate should continue (lambda -> 0), where it does
    not help the gate should exit (lambda -> 1)."""
    mask = torch.ones(1, 1)
    helps = torch.tensor([3.0, 1.0])[:, None, None]
    useless = torch.tensor([1.0, 1.0])[:, None, None]
    low, high = torch.full((2, 1, 1), -6.0), torch.full((2, 1, 1), 6.0)
    def loss(ce, g):
        return adaptive_gate_loss(ce, g, 50, 0.005, mask)

    assert loss(helps, low) < loss(helps, high)
    assert loss(useless, high) < loss(useless, low)


def test_adaptive_gate_objective_does_not_reach_the_lm():
    logits = [torch.randn(4, 1, 9, requires_grad=True) for _ in range(3)]
    gates = torch.randn(3, 4, 1, requires_grad=True)
    out = compute_objective(ObjectiveConfig(kind="adaptive_gate"), LoopedOutput(logits, gates),
                            torch.randint(0, 9, (1, 4)))
    out.loss.backward()
    assert all(lg.grad is None for lg in logits)
    # Eq. 5-6 train lambda_2..lambda_R; lambda_1 has no step before it to improve on
    assert gates.grad[0].abs().sum() == 0 and (gates.grad[1:].abs().sum((1, 2)) > 0).all()
    gates.grad = None
    out = compute_objective(ObjectiveConfig(kind="adaptive_gate", gate_target="lookahead"),
                            LoopedOutput(logits, gates), torch.randint(0, 9, (1, 4)))
    out.loss.backward()
    assert gates.grad[-1].abs().sum() == 0 and (gates.grad[:-1].abs().sum((1, 2)) > 0).all()


def _sig(x):
    return 1 / (1 + math.exp(-x))


def _bce(lam, w):  # -[w log(1 - lambda) + (1 - w) log(lambda)]
    return -(w * math.log(1 - lam) + (1 - w) * math.log(lam))


@pytest.mark.parametrize("target", ["paper", "lookahead"])
def test_stage2_gate_loss_by_hand_on_three_steps(target):
    """Ouro Eq. 5-6 on one token with L = (2.0, 1.5, 1.49): I_2 = 0.5, I_3 = 0.01,
    w_t = sigmoid(k (I_t - gamma)); the loss is the mean over t = 2, 3 of the BCE of
    lambda_t against the exit target 1 - w_t. `lookahead` (ours) pairs lambda_1, lambda_2 with
    the improvements of the next step instead."""
    k, gamma = 50.0, 0.005
    ce = torch.tensor([2.0, 1.5, 1.49])[:, None, None]
    g = torch.tensor([0.3, -0.2, 0.7])[:, None, None]
    w2, w3 = _sig(k * (0.5 - gamma)), _sig(k * (0.01 - gamma))
    if target == "paper":
        want = (_bce(_sig(-0.2), w2) + _bce(_sig(0.7), w3)) / 2
    else:
        want = (_bce(_sig(0.3), w2) + _bce(_sig(-0.2), w3)) / 2
    got = adaptive_gate_loss(ce, g, k, gamma, torch.ones(1, 1), target)
    assert got.item() == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind,steps", [("last", [3]), ("all", [0, 1, 2, 3]), ("few", [2, 3])])
def test_flt_objectives_train_the_chosen_loop_steps(kind, steps):
    """last / all / few (FLT: END, STEP, FEW = loops floor(2R/3)..R-1, 0-based) are the mean
    CE of those steps; the gate gets no gradient."""
    logits = [torch.randn(5, 2, 11, requires_grad=True) for _ in range(4)]
    gates = torch.randn(4, 5, 2, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    out = compute_objective(ObjectiveConfig(kind=kind), LoopedOutput(logits, gates), labels)
    ce = [torch.nn.functional.cross_entropy(lg.transpose(0, 1).reshape(-1, 11), labels.flatten())
          for lg in logits]
    want = sum(ce[t] for t in steps) / len(steps)
    assert out.loss.item() == pytest.approx(want.item(), rel=1e-6)
    out.loss.backward()
    assert gates.grad is None
    assert [lg.grad is not None for lg in logits] == [t in steps for t in range(4)]



class _Calls(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_exit_cumsum_is_torch_cumsum_bit_for_bit_and_deterministic_on_cuda():
    """The exit distribution's running sum equals torch.cumsum on the CPU to the bit (so every
    earlier number stands) without calling it: on CUDA torch.cumsum of floats raises under
    torch.use_deterministic_algorithms, which the CUDA tier runs under."""
    from pretrain.model.objective import _cumsum

    x = torch.randn(9, 33, 5) * 10
    assert torch.equal(_cumsum(x), torch.cumsum(x, 0))
    with _Calls() as calls:
        exit_log_probs(torch.randn(4, 3, 2))
    assert "log_sigmoid" in calls.names and not any("cumsum" in n for n in calls.names)
