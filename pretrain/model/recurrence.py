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
the last min(k, R): `poisson`, their "per-batch" draw. Their released configs draw per sequence
("per-sequence": each sequence i its own T_i, run as n_i = T_i - min(T_i, k) steps without a
graph, then k_i = min(T_i, k) with one): `model.loops_per_sequence: true`. Each sample's T_i is
a function of (seed, step, its index in the step's global batch); the step runs R = max_i T_i
(over the global batch: every rank, stage and micro-batch the same R; theirs: the rank's batch)
and k = min(R, k) -- exactly their two phases, max_i n_i and max_i k_i steps long -- and a
sequence idles (its state unchanged) for the first steps of each phase it does not use. Theirs
idles for the last ones; a step of a family allowed this (`LoopFamily.steps_alike`: every step
the same map of (x_{t-1}, e)) is the same function either way, and starting late keeps every
sequence active on the step that is read out.

The expected cost of a step (`expected_loops`) is what FLOPs, MFU and the planner count: a
no-graph recurrence costs one forward, a backpropagated one forward + backward.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

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


def draw_loops(m: ModelConfig, seed: int, step: int, sample: int | None = None) -> int:
    """R of training step `step` (0-based) from the run seed alone (of sample `sample` of the
    step's global batch, per-sequence)."""
    if m.loops_sampler == "fixed":
        return m.loops
    parts = (seed, step) if sample is None else (seed, step, sample, 2)
    gen = torch.Generator().manual_seed(mixed_seed(*parts))
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
              micro_batches: int, micro_batch_size: int = 1, dp_size: int = 1) -> LoopPlan:
    """The step's R and k, and for each micro-batch of this data-parallel rank the seeds of
    its samples' initial states (families that start from a random state): a function of
    (seed, step, the sample's index in the step's global batch) -- the index the data loader
    gives it (data_pipeline/loader.py `RankSpec.samples`), so any data-parallel split, micro-
    batch size or accumulation draws the same state for the same sample. Per-sequence, also
    each sample's (n_i, k_i)."""
    per_rank = micro_batches * micro_batch_size
    mine = [[dp_rank * per_rank + i * micro_batch_size + j for j in range(micro_batch_size)]
            for i in range(micro_batches)]
    seeds = tuple(tuple(mixed_seed(seed, step, s, 1) for s in mb) for mb in mine)
    if not m.loops_per_sequence:
        loops = draw_loops(m, seed, step)
        return LoopPlan(loops, backprop_count(loops, backprop_loops), seeds)
    totals = [draw_loops(m, seed, step, s) for s in range(dp_size * per_rank)]
    loops = max(totals)

    def phases(total: int) -> tuple[int, int]:
        k = backprop_count(total, backprop_loops)
        return total - k, k

    return LoopPlan(loops, backprop_count(loops, backprop_loops), seeds,
                    tuple(tuple(phases(totals[s]) for s in mb) for mb in mine))


def active_steps(depths: tuple[tuple[int, int], ...], loops: int, backprop: int) -> Tensor:
    """[R, B] bool: whether each sample of a micro-batch updates its state on each loop step
    (0-based): its n_i steps at the end of the first R - k, its k_i at the end of the last k."""
    n = torch.tensor([d[0] for d in depths])
    k = torch.tensor([d[1] for d in depths])
    t = torch.arange(loops)[:, None]
    first = loops - backprop
    return torch.where(t < first, t >= first - n, t >= loops - k)


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


def step_samples(cfg) -> int:
    """Samples in one training step of the run config `cfg`, over every data-parallel rank
    (a depth drawn per sequence runs the largest of them)."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.data


def _step_distribution(m: ModelConfig, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(R values, probabilities) of a step's R: the draw, or per-sequence the largest of
    `batch` draws (P(R <= r) = F(r)^batch)."""
    r, pmf = _distribution(m)
    if not m.loops_per_sequence or batch <= 1:
        return r, pmf
    cdf = np.clip(np.cumsum(pmf), 0.0, 1.0) ** batch
    return r, np.diff(cdf, prepend=0.0)


def expected_loops(m: ModelConfig, backprop_loops: int, batch: int = 1) -> tuple[float, float]:
    """(E[R], E[k]) of a training step of `batch` global samples: exact for `fixed`, by
    quadrature otherwise."""
    if m.loops_sampler == "fixed":
        return float(m.loops), float(backprop_count(m.loops, backprop_loops))
    r, pmf = _step_distribution(m, batch)
    k = np.minimum(r, backprop_loops) if backprop_loops else r
    return float((pmf * r).sum()), float((pmf * k).sum())


def window_loops(m: ModelConfig, backprop_loops: int, quantile: float = 0.99,
                 batch: int = 1) -> int:
    """Loop steps whose activations a step keeps, as the planner sizes memory: k, or with a
    sampled R and no truncation R's `quantile` (a longer draw needs more)."""
    if m.loops_sampler == "fixed":
        return backprop_count(m.loops, backprop_loops)
    if backprop_loops:
        return backprop_loops
    r, pmf = _step_distribution(m, batch)
    return int(r[np.searchsorted(np.cumsum(pmf), quantile)])
