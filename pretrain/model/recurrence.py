"""How many loops a training step runs and how many of them it backpropagates through.

Huginn-0125 (Geiping et al. 2025, arXiv 2502.05171; seal-rg/recurrent-pretraining,
recpre/raven_modeling_minimal.py `randomized_iteration_sampler`) draws the recurrence count of
every training step: with mean r = `model.loops` and sigma = `model.loops_sigma` (0.5),

    rate ~ LogNormal(ln(r) - sigma^2 / 2, sigma),    R = Poisson(rate) + 1

and runs the first R - k recurrences without a graph, the last k = min(`train.backprop_loops`,
R) with one (their n = max(R - k, 0) and k = min(k, R); E[rate] = r, so E[R] = r + 1). Their
draw comes from the global torch RNG of each rank; ours is a function of (train.seed, step),
so every rank draws the same R and a resumed run draws the same sequence. `fixed` runs R =
model.loops every step; `train.backprop_loops` 0 backpropagates through every step. Both
apply to every loop mode. Evaluation runs model.loops with every step (theirs: r, k = 0).
Parcae (sandyresearch/parcae, parcae_lm/models/parcae/parcae.py `randomized_iteration_sampler`,
its default "poisson-truncated-full") draws R = max(Poisson(r), 1) and backpropagates through
the last min(k, R): `poisson` (their "per-batch" draw, one R for the step; their released
configs draw per sequence, which is not offered).

The expected cost of a step (`expected_loops`) is what FLOPs, MFU and the planner count: a
no-graph recurrence costs one forward, a backpropagated one forward + backward.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from core.model_interface import LoopPlan
from pretrain.model.config import ModelConfig

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) mixing a seed with a counter
_MASK = (1 << 63) - 1


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, ...), distinct for distinct tuples in practice."""
    h = 0
    for p in parts:
        h = ((h ^ (p & _MASK)) * _MIX + 1) & _MASK
    return h


def draw_loops(m: ModelConfig, seed: int, step: int) -> int:
    """R of training step `step` (0-based) from the run seed alone."""
    if m.loops_sampler == "fixed":
        return m.loops
    gen = torch.Generator().manual_seed(mixed_seed(seed, step))
    if m.loops_sampler == "poisson":
        rate = torch.tensor(float(m.loops), dtype=torch.float64)
        return max(int(torch.poisson(rate, generator=gen).item()), 1)
    mu = math.log(m.loops) - m.loops_sigma ** 2 / 2
    rate = torch.exp(mu + m.loops_sigma * torch.randn((), generator=gen, dtype=torch.float64))
    return int(torch.poisson(rate, generator=gen).item()) + 1


def backprop_count(loops: int, backprop_loops: int) -> int:
    """Steps with a graph out of `loops`: the last min(k, R); k = 0 means all."""
    return min(backprop_loops, loops) if backprop_loops else loops


def loop_plan(m: ModelConfig, backprop_loops: int, seed: int, step: int, dp_rank: int,
              micro_batches: int, micro_batch_size: int = 1) -> LoopPlan:
    """The step's R and k, and for each micro-batch of this data-parallel rank the seeds of
    its samples' initial states (families that start from a random state): a function of
    (seed, step, the sample's index in the step's global batch) -- the index the data loader
    gives it (data_pipeline/loader.py `RankSpec.samples`), so any data-parallel split, micro-
    batch size or accumulation draws the same state for the same sample."""
    loops = draw_loops(m, seed, step)
    per_rank = micro_batches * micro_batch_size
    return LoopPlan(loops, backprop_count(loops, backprop_loops), tuple(
        tuple(mixed_seed(seed, step, dp_rank * per_rank + i * micro_batch_size + j, 1)
              for j in range(micro_batch_size)) for i in range(micro_batches)))


def _distribution(m: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(R values, their probabilities) of a drawn R: poisson exactly (up to mass < 1e-12
    beyond the last value), poisson_lognormal by Gauss-Hermite quadrature over the log-normal
    rate and the Poisson sum (mass lost < 1e-6)."""
    if m.loops_sampler == "poisson":
        n = np.arange(int(m.loops * 3 + 50))
        pmf = np.exp(n * math.log(m.loops) - m.loops - np.array([math.lgamma(k + 1) for k in n]))
        pmf[1] += pmf[0]  # R = max(Poisson, 1)
        return n[1:], pmf[1:]
    z, w = np.polynomial.hermite_e.hermegauss(80)  # nodes/weights of the standard normal
    w = w / w.sum()
    rates = np.exp(math.log(m.loops) - m.loops_sigma ** 2 / 2 + m.loops_sigma * z)
    n = np.arange(int(rates.max() * 3 + 50))  # Poisson counts; R = n + 1
    log_pmf = n[None, :] * np.log(rates[:, None]) - rates[:, None] - \
        np.array([math.lgamma(k + 1) for k in n])[None, :]
    return n + 1, (w[:, None] * np.exp(log_pmf)).sum(0)


def expected_loops(m: ModelConfig, backprop_loops: int) -> tuple[float, float]:
    """(E[R], E[k]) of a training step: exact for `fixed`, by quadrature otherwise."""
    if m.loops_sampler == "fixed":
        return float(m.loops), float(backprop_count(m.loops, backprop_loops))
    r, pmf = _distribution(m)
    k = np.minimum(r, backprop_loops) if backprop_loops else r
    return float((pmf * r).sum()), float((pmf * k).sum())


def window_loops(m: ModelConfig, backprop_loops: int, quantile: float = 0.99) -> int:
    """Loop steps whose activations a step keeps, as the planner sizes memory: k, or with a
    sampled R and no truncation R's `quantile` (a longer draw needs more)."""
    if m.loops_sampler == "fixed":
        return backprop_count(m.loops, backprop_loops)
    if backprop_loops:
        return backprop_loops
    r, pmf = _distribution(m)
    return int(r[np.searchsorted(np.cumsum(pmf), quantile)])
