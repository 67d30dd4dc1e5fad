"""How many loops a training step runs and how many of them it backpropagates through: the
`recurrence` section, and `Recurrence`, which turns it into each step's `LoopPlan`.

`model.loops` is the model's depth R: what evaluation, decoding and export run, and the mean
the samplers draw around (Huginn's and Parcae's `mean_recurrence`, a model field there too).
Huginn-0125 (Geiping et al. 2025, arXiv 2502.05171; seal-rg/recurrent-pretraining,
recpre/raven_modeling_minimal.py `randomized_iteration_sampler`) draws the recurrence count of
every training step: with mean r = `model.loops` and sigma = `recurrence.sigma` (0.5),

    rate ~ LogNormal(ln(r) - sigma^2 / 2, sigma),    R = Poisson(rate) + 1

and runs the first R - k recurrences without a graph, the last k = min(`recurrence.backprop`,
R) with one (their n = max(R - k, 0) and k = min(k, R); E[rate] = r, so E[R] = r + 1). Their
draw comes from the global torch RNG of each rank; ours is a function of (train.seed, step),
so every rank draws the same R and a resumed run draws the same sequence. `fixed` runs R =
model.loops every step; `recurrence.backprop` 0 backpropagates through every step. Both
apply to every loop mode. Evaluation runs model.loops with every step (theirs: r, k = 0).
Parcae (sandyresearch/parcae, parcae_lm/models/parcae/parcae.py `randomized_iteration_sampler`,
its default "poisson-truncated-full") draws R = max(Poisson(r), 1) and backpropagates through
the last min(k, R): `poisson`, their "per-batch" draw. Their released configs draw per sequence
("per-sequence": each sequence i its own T_i, run as n_i = T_i - min(T_i, k) steps without a
graph, then k_i = min(T_i, k) with one): `recurrence.per_sequence: true`. Each sample's T_i is
a function of (seed, step, its index in the step's global batch); the step runs R = max_i T_i
(over the global batch: every rank, stage and micro-batch the same R; theirs: the rank's batch)
and k = min(R, k) -- exactly their two phases, max_i n_i and max_i k_i steps long -- and a
sequence idles (its state unchanged) for the first steps of each phase it does not use. Theirs
idles for the last ones; a step of a family allowed this (`LoopFamily.steps_alike`: every step
the same map of (x_{t-1}, e)) is the same function either way, and starting late keeps every
sequence active on the step that is read out.

Loop growth (arXiv 2609.19107's Loop-Grow: K 2 -> 4 mid-run): `recurrence.grow` lists the
shallower phases a run trains through before model.loops, `{until: step, loops: R}` each --
steps before `until` run (or draw around) that R -- and `recurrence.rewarm_steps` re-warms the
learning rate linearly from zero over that many steps after each raise (the schedule's lr
times (step - raise + 1) / rewarm_steps). The same weights serve every depth, so nothing else
changes at a raise.

The expected cost of a step (`Recurrence.expected`) is what FLOPs, MFU and the planner count: a
no-graph recurrence costs one forward, a backpropagated one forward + backward.

Configs of the earlier form (`model.loops_sampler`, `model.loops_sigma`,
`model.loops_per_sequence`, `train.backprop_loops`) still load: `MOVED` maps each to its key
here, and loading says so in one line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from core.config_schema import require
from core.model_interface import LoopPlan
from pretrain.model.config import ModelConfig

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) mixing a seed with a counter
_MASK = (1 << 63) - 1


@dataclass
class GrowPhase:
    until: int  # steps before this one (0-based) run `loops`
    loops: int


@dataclass
class RecurrenceConfig:
    # `model.loops` every step, Huginn's draw per step, R = Poisson(LogNormal(ln(loops) -
    # sigma^2/2, sigma)) + 1, or Parcae's R = max(Poisson(loops), 1)
    sampler: Literal["fixed", "poisson_lognormal", "poisson"] = "fixed"
    sigma: float = 0.5  # sigma of the log-normal rate (Huginn: 0.5)
    # draw the depth per sequence (Parcae's released "per-sequence"): each sample its own, the
    # step running the largest
    per_sequence: bool = False
    # truncated backprop: gradients flow through the last k loop steps only, the earlier ones
    # run without a graph (Huginn: 8); 0: through every step
    backprop: int = 0
    # loop growth: shallower phases before model.loops, [{until: step, loops: R}, ...]
    grow: list[GrowPhase] = field(default_factory=list)
    rewarm_steps: int = 0  # lr re-warmed from 0 over this many steps after each raise


# the earlier form of these keys -> where they live now (pretrain/config.py moves them)
MOVED = {"model.loops_sampler": "recurrence.sampler", "model.loops_sigma": "recurrence.sigma",
         "model.loops_per_sequence": "recurrence.per_sequence",
         "train.backprop_loops": "recurrence.backprop"}


def validate_recurrence(r: RecurrenceConfig, m: ModelConfig) -> None:
    require(r.sigma > 0, "recurrence.sigma", f"must be > 0, got {r.sigma}")
    require(r.backprop >= 0, "recurrence.backprop", f"must be >= 0, got {r.backprop}")
    require(r.rewarm_steps >= 0, "recurrence.rewarm_steps", f"must be >= 0, got {r.rewarm_steps}")
    require(not r.per_sequence or r.sampler != "fixed", "recurrence.per_sequence",
            "draws each sequence's depth: set recurrence.sampler (poisson, poisson_lognormal)")
    until, loops = 0, 0
    for i, phase in enumerate(r.grow):
        require(phase.until > until and phase.loops >= 1 and phase.loops > loops, f"recurrence.grow[{i}]",
                f"phases raise R at later steps: until {phase.until} after {until}, loops "
                f"{phase.loops} in {loops + 1}..")
        until, loops = phase.until, phase.loops
    require(loops < m.loops, "recurrence.grow",
            f"grows to model.loops {m.loops}: each phase's loops must be below it, got {loops}")


def mixed_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, ...), distinct for distinct tuples in practice."""
    h = 0
    for p in parts:
        h = ((h ^ (p & _MASK)) * _MIX + 1) & _MASK
    return h


def backprop_count(loops: int, backprop: int) -> int:
    """Steps with a graph out of `loops`: the last min(k, R); k = 0 means all."""
    return min(backprop, loops) if backprop else loops


def active_steps(depths: tuple[tuple[int, int], ...], loops: int, backprop: int) -> Tensor:
    """[R, B] bool: whether each sample of a micro-batch updates its state on each loop step
    (0-based): its n_i steps at the end of the first R - k, its k_i at the end of the last k."""
    n = torch.tensor([d[0] for d in depths])
    k = torch.tensor([d[1] for d in depths])
    t = torch.arange(loops)[:, None]
    first = loops - backprop
    return torch.where(t < first, t >= first - n, t >= loops - k)


def step_samples(cfg) -> int:
    """Samples in one training step of the run config `cfg`, over every data-parallel rank
    (a depth drawn per sequence runs the largest of them)."""
    return cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.parallel.data


class Recurrence:
    """The run's loop schedule: `model.loops` and the `recurrence` section. Methods taking a
    `step` answer for that step's growth phase; without one, for the final phase (model.loops:
    the deepest, what memory is sized for)."""

    def __init__(self, loops: int, r: RecurrenceConfig):
        self.loops, self.cfg = loops, r

    @classmethod
    def of(cls, cfg) -> Recurrence:
        """The schedule of the run config `cfg`."""
        return cls(cfg.model.loops, cfg.recurrence)

    @property
    def varies(self) -> bool:
        """Whether R may differ between steps (drawn, or raised by growth)."""
        return self.cfg.sampler != "fixed" or bool(self.cfg.grow)

    def loops_at(self, step: int | None = None) -> int:
        """The phase's R (the mean a sampler draws around) at training step `step`."""
        if step is not None:
            for phase in self.cfg.grow:
                if step < phase.until:
                    return phase.loops
        return self.loops

    def lr_factor(self, step: int) -> float:
        """The re-warm's factor on the schedule's lr at `step` (1 outside a re-warm)."""
        w = self.cfg.rewarm_steps
        for phase in self.cfg.grow:
            if w and phase.until <= step < phase.until + w:
                return (step - phase.until + 1) / w
        return 1.0

    def draw(self, seed: int, step: int, sample: int | None = None) -> int:
        """R of training step `step` (0-based) from the run seed alone (of sample `sample` of
        the step's global batch, per-sequence)."""
        mean = self.loops_at(step)
        if self.cfg.sampler == "fixed":
            return mean
        parts = (seed, step) if sample is None else (seed, step, sample, 2)
        gen = torch.Generator().manual_seed(mixed_seed(*parts))
        if self.cfg.sampler == "poisson":
            rate = torch.tensor(float(mean), dtype=torch.float64)
            return max(int(torch.poisson(rate, generator=gen).item()), 1)
        sigma = self.cfg.sigma
        mu = math.log(mean) - sigma ** 2 / 2
        rate = torch.exp(mu + sigma * torch.randn((), generator=gen, dtype=torch.float64))
        return int(torch.poisson(rate, generator=gen).item()) + 1

    def plan(self, seed: int, step: int, dp_rank: int, micro_batches: int,
             micro_batch_size: int = 1, dp_size: int = 1) -> LoopPlan:
        """The step's R and k, and for each micro-batch of this data-parallel rank the seeds of
        its samples' initial states (families that start from a random state): a function of
        (seed, step, the sample's index in the step's global batch) -- the index the data
        loader gives it (data_pipeline/loader.py `RankSpec.samples`), so any data-parallel
        split, micro-batch size or accumulation draws the same state for the same sample.
        Per-sequence, also each sample's (n_i, k_i)."""
        k = self.cfg.backprop
        per_rank = micro_batches * micro_batch_size
        mine = [[dp_rank * per_rank + i * micro_batch_size + j for j in range(micro_batch_size)]
                for i in range(micro_batches)]
        seeds = tuple(tuple(mixed_seed(seed, step, s, 1) for s in mb) for mb in mine)
        if not self.cfg.per_sequence:
            loops = self.draw(seed, step)
            return LoopPlan(loops, backprop_count(loops, k), seeds)
        totals = [self.draw(seed, step, s) for s in range(dp_size * per_rank)]
        loops = max(totals)

        def phases(total: int) -> tuple[int, int]:
            graph = backprop_count(total, k)
            return total - graph, graph

        return LoopPlan(loops, backprop_count(loops, k), seeds,
                        tuple(tuple(phases(totals[s]) for s in mb) for mb in mine))

    def _distribution(self, mean: int) -> tuple[np.ndarray, np.ndarray]:
        """(R values, their probabilities) of one draw around `mean`: poisson exactly (up to
        mass < 1e-12 beyond the last value), poisson_lognormal by Gauss-Hermite quadrature over
        the log-normal rate and the Poisson sum (mass lost < 1e-6)."""
        if self.cfg.sampler == "poisson":
            n = np.arange(int(mean * 3 + 50))
            pmf = np.exp(n * math.log(mean) - mean - np.array([math.lgamma(k + 1) for k in n]))
            pmf[1] += pmf[0]  # R = max(Poisson, 1)
            return n[1:], pmf[1:]
        sigma = self.cfg.sigma
        z, w = np.polynomial.hermite_e.hermegauss(80)  # nodes/weights of the standard normal
        w = w / w.sum()
        rates = np.exp(math.log(mean) - sigma ** 2 / 2 + sigma * z)
        n = np.arange(int(rates.max() * 3 + 50))  # Poisson counts; R = n + 1
        log_pmf = n[None, :] * np.log(rates[:, None]) - rates[:, None] - \
            np.array([math.lgamma(k + 1) for k in n])[None, :]
        return n + 1, (w[:, None] * np.exp(log_pmf)).sum(0)

    def _step_distribution(self, batch: int, step: int | None) -> tuple[np.ndarray, np.ndarray]:
        """(R values, probabilities) of a step's R: the draw, or per-sequence the largest of
        `batch` draws (P(R <= r) = F(r)^batch)."""
        r, pmf = self._distribution(self.loops_at(step))
        if not self.cfg.per_sequence or batch <= 1:
            return r, pmf
        cdf = np.clip(np.cumsum(pmf), 0.0, 1.0) ** batch
        return r, np.diff(cdf, prepend=0.0)

    def expected(self, batch: int = 1, step: int | None = None) -> tuple[float, float]:
        """(E[R], E[k]) of a training step of `batch` global samples: exact for `fixed`, by
        quadrature otherwise."""
        k = self.cfg.backprop
        if self.cfg.sampler == "fixed":
            mean = self.loops_at(step)
            return float(mean), float(backprop_count(mean, k))
        r, pmf = self._step_distribution(batch, step)
        ks = np.minimum(r, k) if k else r
        return float((pmf * r).sum()), float((pmf * ks).sum())

    def window(self, batch: int = 1, quantile: float = 0.99, step: int | None = None) -> int:
        """Loop steps whose activations a step keeps, as the planner sizes memory: k, or with
        a sampled R and no truncation R's `quantile` (a longer draw needs more)."""
        k = self.cfg.backprop
        if self.cfg.sampler == "fixed":
            return backprop_count(self.loops_at(step), k)
        if k:
            return k
        r, pmf = self._step_distribution(batch, step)
        return int(r[np.searchsorted(np.cumsum(pmf), quantile)])
