"""Training objectives of a looped LM with an exit gate (Ouro, arXiv 2510.25741, Sec. 3).

Exit distribution over the R loop steps, from the per-step gate lambda_t:
    p_t = lambda_t * prod_{j<t} (1 - lambda_j)     t < R
    p_R = prod_{j<R} (1 - lambda_j)                 (the remaining mass)
Stage 1 (`elbo`): loss = sum_t p_t CE_t - beta * H(p), the entropy-regularised ELBO with a
uniform prior over exit steps, averaged over tokens.
Stage 2 (`adaptive_gate`, Ouro Eq. 5-6, `objective.gate_target: paper`): the LM is frozen;
the gate at step t = 2..R learns whether step t still improved on step t - 1:
    I_t = max(0, CE_{t-1} - CE_t)  (per token, detached),   w_t = sigmoid(k (I_t - gamma))
    loss = mean over t = 2..R and tokens of BCE(lambda_t, 1 - w_t)
         = -[w_t log(1 - lambda_t) + (1 - w_t) log lambda_t]
(w_t is the ideal probability of continuing; lambda_1 is not trained). `gate_target: lookahead`
is ours, not the paper's: lambda_t for t = 1..R-1 learns from the improvement of the *next*
step, I_t = max(0, CE_t - CE_{t+1}).

The FLT paper's objectives (arXiv 2605.18797; the authors' `loss_type` END / STEP / FEW) train
no gate: `last` is the CE of step R, `all` the mean CE over every step, `few` the mean over
steps floor(2R/3)+1..R (1-based; their 0-based range(2K//3, K)).

Truncated backprop (`recurrence.backprop` k): the loss is the same function of the same
steps; the terms of steps before the last k -- their CE, gates and exit masses -- enter it as
constants (they were computed without a graph), so gradients flow through the last k only.

Everything is computed in log space (logsigmoid), so saturated gates give exact 0/1 masses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from core.model_interface import IGNORE_INDEX
from pretrain.model.config import ObjectiveConfig
from pretrain.model.looped import LoopedOutput
from pretrain.model.memory import DeferredLogits


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar, differentiable
    ce: Tensor  # [R] mean CE per loop step (detached; NaN for a step not read out)
    exit_prob: Tensor  # [R] mean p_t (detached)
    gate: Tensor  # [R] mean lambda_t (detached)
    expected_loops: Tensor  # scalar: mean of sum_t t * p_t
    entropy: Tensor  # scalar: mean H(p)
    tokens: Tensor  # scalar: tokens that counted (labels != IGNORE_INDEX)
    hidden_norm: Tensor | None = None  # [R] mean norm of the block output per loop (FLT's plot)


def token_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross entropy per token from logits [S, B, V] and labels [S, B]; 0 where ignored."""
    return F.cross_entropy(_at_least_fp32(logits).flatten(0, 1), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none").view_as(labels)


def per_step_ce(logits: list[Tensor | DeferredLogits | None], labels: Tensor,
                cross_entropy=token_cross_entropy, trained: range | None = None) -> Tensor:
    """Token-level cross entropy of every loop step: [R, S, B], 0 where ignored. Steps outside
    `trained` (default: all) are measured without a graph: they are only logged. Deferred
    logits (train.loss_chunk_tokens) are scored chunk by chunk, never materialised."""
    keep = range(len(logits)) if trained is None else trained
    out = []
    for t, lg in enumerate(logits):
        if lg is None:  # not read out in training: no CE to log
            out.append(torch.full(labels.shape, float("nan"), device=labels.device))
            continue
        with torch.set_grad_enabled(torch.is_grad_enabled() and t in keep):
            if isinstance(lg, DeferredLogits):
                out.append(lg.cross_entropy(labels, cross_entropy))
            else:
                out.append(cross_entropy(lg if t in keep else lg.detach(), labels))
    return torch.stack(out)


def _at_least_fp32(x: Tensor) -> Tensor:
    """bf16/fp16 activations are upcast; fp64 (gradcheck) is kept."""
    return x.float() if x.element_size() < 4 else x


def _cumsum(x: Tensor) -> Tensor:
    """torch.cumsum(x, 0) as the CPU computes it (a running sum in fp64, each prefix cast back),
    step by step: the same bits on every device, and allowed under
    torch.use_deterministic_algorithms on CUDA, where torch.cumsum of floats raises. R terms,
    so R small kernels."""
    acc, out = torch.zeros_like(x[0], dtype=torch.float64), []
    for t in range(x.shape[0]):
        acc = acc + x[t].double()
        out.append(acc.to(x.dtype))
    return torch.stack(out)


def exit_log_probs(gate_logits: Tensor) -> Tensor:
    """log p_t for the exit distribution, [R, ...] from gate logits [R, ...]."""
    g = _at_least_fp32(gate_logits)
    log_stay = F.logsigmoid(-g)  # log(1 - lambda)
    survive = _cumsum(log_stay) - log_stay  # sum_{j<t} log(1 - lambda_j)
    log_p = F.logsigmoid(g) + survive
    return torch.cat((log_p[:-1], survive[-1:]), 0)


def _masked_mean(x: Tensor, mask: Tensor, count: Tensor) -> Tensor:
    """Mean over the masked token dims of x [..., S, B] -> [...]."""
    return (x * mask).sum(dim=(-2, -1)) / count


def compute_objective(cfg: ObjectiveConfig, out: LoopedOutput, labels: Tensor,
                      cross_entropy=token_cross_entropy) -> ObjectiveOutput:
    """labels: [B, S] as the data gives them. `cross_entropy(logits [S, B, V'], labels [S, B])`
    is swapped for the vocab-parallel one under tensor parallelism."""
    labels = labels.t()
    mask = (labels != IGNORE_INDEX).float()
    count = mask.sum().clamp_min(1)  # a tensor: no host sync on GPU
    trained = None if trains_gate(cfg.kind) else trained_steps(cfg.kind, len(out.logits))
    ce = per_step_ce(out.logits, labels, cross_entropy, trained)
    if cfg.kind == "elbo":
        loss = (elbo_per_token(ce, out.gate_logits, cfg.beta) * mask).sum() / count
    elif cfg.kind == "adaptive_gate":
        loss = adaptive_gate_loss(ce.detach(), out.gate_logits, cfg.gate_k, cfg.gate_gamma, mask,
                                  cfg.gate_target)
    else:
        loss = (ce[trained.start:trained.stop].mean(0) * mask).sum() / count
    with torch.no_grad():
        log_p = exit_log_probs(out.gate_logits)
        p = log_p.exp()
        entropy = -(p * log_p).sum(0)
        steps = torch.arange(1, p.shape[0] + 1, device=p.device, dtype=p.dtype)
        return ObjectiveOutput(
            loss=loss,
            ce=_masked_mean(ce, mask, count),
            exit_prob=_masked_mean(p, mask, count),
            gate=_masked_mean(torch.sigmoid(_at_least_fp32(out.gate_logits)), mask, count),
            expected_loops=_masked_mean((steps[:, None, None] * p).sum(0), mask, count),
            entropy=_masked_mean(entropy, mask, count),
            tokens=count,
            hidden_norm=out.hidden_norm,
        )


def trained_steps(kind: str, loops: int) -> range:
    """The loop steps (0-based) whose CE the FLT objectives train."""
    return {"last": range(loops - 1, loops), "all": range(loops),
            "few": range(2 * loops // 3, loops)}[kind]


def trains_gate(kind: str) -> bool:
    """Ouro's objectives train the exit gate; the FLT paper's have none (it is left untrained)."""
    return kind in ("elbo", "adaptive_gate")


def readout_steps(kind: str, loops: int) -> range:
    """The loop steps whose logits training needs: every one for the gate objectives (the
    ELBO weighs them all); the trained ones for the FLT objectives (the other steps' CE is then
    not logged during training -- `pretrain eval` measures every step)."""
    return range(loops) if trains_gate(kind) else trained_steps(kind, loops)


def adaptive_gate_loss(ce: Tensor, gate_logits: Tensor, k: float, gamma: float, mask: Tensor,
                       target: str = "paper") -> Tensor:
    """Stage-2 gate loss from detached per-step CE [R, S, B] (needs R >= 2)."""
    improvement = (ce[:-1] - ce[1:]).clamp_min(0)  # [t] = step t -> t + 1 (0-based)
    cont = torch.sigmoid(k * (improvement - gamma))
    gates = gate_logits[1:] if target == "paper" else gate_logits[:-1]
    bce = F.binary_cross_entropy_with_logits(_at_least_fp32(gates), 1 - cont, reduction="none")
    return (bce * mask).sum() / (mask.sum().clamp_min(1) * bce.shape[0])


def elbo_per_token(ce: Tensor, gate_logits: Tensor, beta: float) -> Tensor:
    """Stage-1 loss per token: sum_t p_t CE_t - beta H(p), from [R, ...] inputs."""
    log_p = exit_log_probs(gate_logits)
    p = log_p.exp()
    return (p * ce).sum(0) + beta * (p * log_p).sum(0)
