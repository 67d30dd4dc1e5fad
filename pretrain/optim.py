"""Optimizers and learning-rate schedules.

`adamw`: AdamW with decay on matrices only. `muon` (the FLT authors' recipe): torch.optim.Muon
for the 2-D weights of the decoder layers, AdamW for the embedding, LM head, exit gate and
norms. Muon orthogonalises every fused block (q | k | v, gate | up) as its own matrix, as it
does the separate projections of the FLT code: it steps per-block copies ("proxies") of those
weights and writes them back, so torch's Muon runs unchanged. (Not reproduced: the FLT code's
Muon momentum warm-up from 0.85 to 0.95 over the first 300 steps.)

Every group follows one schedule (`lr_at`, relative to `optim.lr`) scaled to its own peak:
`optim.embedding_lr`, `optim.head_lr`, `optim.muon_lr` (0: `optim.lr`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from core.config_schema import require
from pretrain.kernels import adamw


@dataclass
class OptimConfig:
    # muon: torch.optim.Muon for the layers' matrices, AdamW for embedding, head, gate, norms
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # WSD: the final fraction of steps spent decaying to min_lr
    embedding_lr: float = 0.0  # peak lr of the embedding; 0: lr (every group follows the schedule)
    head_lr: float = 0.0  # peak lr of the LM head; 0: lr
    muon_lr: float = 0.02  # peak lr of Muon's matrices (optim.name: muon)
    muon_momentum: float = 0.95


def validate_optim(o: OptimConfig, zero_stage: int, tensor: int) -> None:
    """Each field's range. warmup_steps may exceed train.max_steps -- a short smoke run of a big
    config ends inside warmup, and the trainer says so (`warmup_notice`)."""
    for name in ("embedding_lr", "head_lr", "muon_lr"):
        require(getattr(o, name) >= 0, f"optim.{name}", f"must be >= 0, got {getattr(o, name)}")
    require(0 <= o.muon_momentum < 1, "optim.muon_momentum", "must be in [0, 1)")
    if o.name == "muon":
        require(zero_stage == 0, "optim.name",
                "muon does not shard with DeepSpeed ZeRO: use parallel.zero_stage=0")
        require(tensor == 1, "optim.name",
                "muon orthogonalises whole matrices and a tensor-parallel rank holds a shard: "
                "use parallel.tensor=1 (data and pipeline parallelism compose)")
    require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
    require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    require(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    require(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    require(o.eps > 0, "optim.eps", "must be > 0")
    require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    require(o.warmup_steps >= 0, "optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")


def warmup_notice(cfg: OptimConfig, max_steps: int) -> str | None:
    """One line when the run ends inside warmup (None otherwise)."""
    if cfg.warmup_steps <= max_steps:
        return None
    return (f"notice: optim.warmup_steps {cfg.warmup_steps} > train.max_steps {max_steps}: the run "
            f"ends inside warmup, at lr {lr_at(cfg, max_steps - 1, max_steps):.3g} of "
            f"optim.lr {cfg.lr:g}")


def _peak(cfg: OptimConfig, value: float) -> float:
    return (value or cfg.lr) / cfg.lr


def param_groups(model: nn.Module, cfg: OptimConfig, exclude: set[int] = frozenset()) -> list[dict]:
    """AdamW groups: decay on matrices only (norms, biases, the gate bias are not decayed, nor
    the matrices the loop family keeps from it: `LoopFamily.undecayed`); the embedding and the
    head in their own groups when their peak lr differs."""
    special = {"embed.weight": _peak(cfg, cfg.embedding_lr), "lm_head.weight": _peak(cfg, cfg.head_lr)}
    family = getattr(model, "family", None)
    undecayed = family.undecayed() if family is not None else frozenset()
    groups: dict[tuple[float, float], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        decay = cfg.weight_decay if p.dim() >= 2 and name not in undecayed else 0.0
        groups.setdefault((special.get(name, 1.0), decay), []).append(p)
    return [{"params": ps, "weight_decay": wd, "lr_scale": scale}
            for (scale, wd), ps in groups.items()]


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights of the prelude, shared block and coda layers."""
    return [p for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and n.split(".")[0] in ("prelude", "block", "coda")]


class MuonAdamW:
    """torch.optim.Muon over the layers' matrices (fused weights per block) + torch.optim.AdamW
    over the rest, as one optimizer: `param_groups`, `state`, `step`, `zero_grad`."""

    def __init__(self, model: nn.Module, cfg: OptimConfig):
        parts = {id(m.weight): m.parts for m in model.modules() if hasattr(m, "parts")}
        self.blocks: list[tuple[nn.Parameter, list[nn.Parameter]]] = []
        for p in muon_matrices(model):
            sizes = parts.get(id(p), (p.shape[0],))
            proxies = [nn.Parameter(b.detach().clone()) for b in p.detach().split(list(sizes))]
            self.blocks.append((p, proxies))
        self.muon = torch.optim.Muon([q for _, qs in self.blocks for q in qs], lr=cfg.muon_lr,
                                     weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum)
        for g in self.muon.param_groups:
            g["lr_scale"] = _peak(cfg, cfg.muon_lr)
        matrices = {id(p) for p, _ in self.blocks}
        self.adamw = torch.optim.AdamW(param_groups(model, cfg, matrices), lr=cfg.lr,
                                       betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        self.state = _JointState(self)

    @property
    def param_groups(self) -> list[dict]:
        return self.adamw.param_groups + self.muon.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for p, proxies in self.blocks:  # the weights may have been loaded since the last step
            sizes = [q.shape[0] for q in proxies]
            grads = p.grad.split(sizes) if p.grad is not None else [None] * len(proxies)
            for q, w, g in zip(proxies, p.split(sizes), grads, strict=True):
                q.copy_(w)
                q.grad = None if g is None else g.clone()
        self.muon.step()
        for p, proxies in self.blocks:
            p.copy_(torch.cat([q.detach() for q in proxies]))
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the weights' gradients (the matrices' too: only their proxies are Muon's)."""
        self.adamw.zero_grad(set_to_none)
        self.muon.zero_grad(set_to_none)
        for p, _ in self.blocks:
            p.grad = None


class _JointState:
    """`optimizer.state[p]` of either optimizer; a fused weight's Muon momentum is the
    concatenation of its blocks' (laid out like the weight, as the checkpoint expects)."""

    def __init__(self, opt: MuonAdamW):
        self.opt = opt
        self.proxies = {id(p): qs for p, qs in opt.blocks}

    def get(self, p: Tensor, default=None) -> dict:
        qs = self.proxies.get(id(p))
        if qs is None:
            return self.opt.adamw.state.get(p, default)
        states = [self.opt.muon.state.get(q) for q in qs]
        if not all(states):
            return default
        return {k: torch.cat([s[k] for s in states]) for k in states[0]}

    def __setitem__(self, p: Tensor, value: dict) -> None:
        qs = self.proxies.get(id(p))
        if qs is None:
            self.opt.adamw.state[p] = value
            return
        for i, q in enumerate(qs):
            self.opt.muon.state[q] = {k: v.split([x.shape[0] for x in qs])[i].clone()
                                      for k, v in value.items()}


def build_optimizer(model: nn.Module, cfg: OptimConfig):
    if cfg.name == "muon":
        return MuonAdamW(model, cfg)
    device = next(model.parameters()).device
    return adamw(param_groups(model, cfg), device, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                 eps=cfg.eps)


def lr_at(cfg: OptimConfig, step: int, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `max_steps`.

    cosine: linear warmup, then cosine from lr to min_lr at the last step.
    wsd:    linear warmup, constant lr, then linear decay to min_lr over the final
            `decay_fraction` of the steps (warmup-stable-decay).
    constant: linear warmup, then lr.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        span = max(max_steps - 1 - cfg.warmup_steps, 1)
        frac = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * frac))
    decay_steps = max(round(cfg.decay_fraction * max_steps), 1)
    decay_start = max_steps - decay_steps
    if step < decay_start:
        return cfg.lr
    frac = min((step - decay_start + 1) / decay_steps, 1.0)
    return cfg.lr + (cfg.min_lr - cfg.lr) * frac


def set_lr(optimizer, lr: float) -> None:
    """Every group at `lr` times its peak relative to optim.lr."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
