"""Single-process trainer: AdamW, lr schedule, clipping, accumulation, NaN skipping, logging.

The step loop is kept thin on purpose: everything per-step is tensors, and host syncs happen
once per step (the finite check) and once per log interval, so the trainer costs little over a
bare PyTorch loop (see bench/overhead.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from data_pipeline.loader import RankSpec, StreamingData
from parallelism.grads import all_ranks_agree, finalize_grads, global_grad_norm, replica_stats
from parallelism.pipeline import PipelineStage, gather_stages, keep_stage
from parallelism.pipeline_balance import describe, resolve_split
from parallelism.tensor_parallel import full_state_dict, parallelize_tensor, vocab_parallel_token_ce
from parallelism.topology import Topology, init_topology
from parallelism.zero import build_zero_engine
from pretrain.checkpoint import save_model
from pretrain.config import Config, ConfigError, dump_config
from pretrain.data import ByteTokenizer, TextData, TokenWindows, load_text_tokens
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import compute_objective, token_cross_entropy
from pretrain.optim import build_optimizer, lr_at, param_groups, set_lr


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class StepStats:
    step: int
    loss: float
    ce: list[float]
    exit_prob: list[float]
    gate: list[float]
    expected_loops: float
    entropy: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    skipped: int  # optimizer steps skipped for a non-finite loss or gradient
    data_skips: int  # samples masked out because their shard was unreadable (on_error: skip)


@dataclass
class RunSummary:
    steps: int
    final_loss: float
    skipped_steps: int
    checkpoint: Path | None
    tensorboard_dir: Path
    history: list[StepStats] = field(default_factory=list)


def default_data(cfg: Config, topo: Topology | None = None):
    """The configured data source for this data-parallel rank: bundled-text windows, or the
    streaming shard loader."""
    topo = topo or Topology()
    spec = RankSpec(cfg.train.micro_batch_size, cfg.train.grad_accum_steps, topo.dp_rank, topo.dp)
    if cfg.data.source == "shards":
        return StreamingData(cfg, topo.dp_rank, topo.dp)
    tokenizer = ByteTokenizer()
    if cfg.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the byte "
                          f"tokenizer's {tokenizer.vocab_size}")
    windows = TokenWindows(load_text_tokens(cfg.data.paths, tokenizer), cfg.train.seq_len,
                           cfg.train.seed)
    return TextData(windows, spec)


class Trainer:
    """Trains on this process's share of the layout: TP shards by construction
    (`parallelize_tensor`), DP ranks on their slice of every global batch."""

    def __init__(self, cfg: Config, model: nn.Module | None = None, data=None,
                 log: Callable[[str], None] = print, tensorboard: bool = True,
                 topology: Topology | None = None):
        self.cfg = cfg
        self.topo = topology or init_topology(cfg)
        self.log = log if self.topo.is_main else (lambda _: None)
        self.device = self.topo.device
        torch.manual_seed(cfg.train.seed)
        model = model if model is not None else LoopedLM(cfg.model)
        self.cross_entropy = token_cross_entropy
        if self.topo.tp > 1:
            parallelize_tensor(model, self.topo, cfg.parallel.sequence_parallel)
            self.cross_entropy = vocab_parallel_token_ce
        self.pipeline = None
        if self.topo.pp > 1:
            split = resolve_split(cfg)
            keep_stage(model, split, self.topo.pp_rank)
            self.pipeline = PipelineStage(model, self.topo, cfg, self.cross_entropy)
            self.log(f"pipeline split ({'explicit' if cfg.parallel.pipeline_split else 'auto'}): "
                     f"{describe(cfg, split)}")
        self.model = model.to(self.device)
        if cfg.objective.kind == "adaptive_gate":  # stage 2: LM frozen, only the gate learns
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("gate."))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine = None  # DeepSpeed ZeRO: it reduces, clips and steps
        if cfg.parallel.zero_stage:
            self.engine = build_zero_engine(self.model, param_groups(self.model, cfg.optim), cfg,
                                            self.topo, pipeline=self.pipeline is not None)
            self.optimizer = self.engine.optimizer
        else:
            self.optimizer = build_optimizer(self.model, cfg.optim)
        self.data = data if data is not None else default_data(cfg, self.topo)
        self._batches = None  # the data's micro-batch iterator, opened on the first step
        self.out_dir = Path(cfg.train.out_dir)
        self.tb_dir = self.out_dir / "tensorboard"
        self.writer = None
        if tensorboard and self.topo.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))
        self.step = 0
        self.skipped = 0
        self.bad_streak = 0
        cuda = self.device.type == "cuda"
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cuda else nullcontext)

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch (all data-parallel ranks)."""
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * t.seq_len * self.topo.dp

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches; returns the last objective
        output, the summed loss and the grad norm (tensors), and whether the step was applied."""
        t = self.cfg.train
        lr = lr_at(self.cfg.optim, self.step, t.max_steps)
        set_lr(self.optimizer, lr)
        self.model.train()
        total = torch.zeros((), device=self.device)
        if self._batches is None:
            self._batches = self.data.batches()
        if self.pipeline is not None:
            batches = [tuple(x.to(self.device) for x in next(self._batches))
                       for _ in range(t.grad_accum_steps)]
            with self.autocast():
                out = self.pipeline.run(batches, self.cfg.parallel.pipeline_schedule)
            if out is not None:
                total = out.loss
        else:
            for _ in range(t.grad_accum_steps):
                inputs, labels = (x.to(self.device) for x in next(self._batches))
                with self.autocast():
                    out = compute_objective(self.cfg.objective, self.model(inputs), labels,
                                            self.cross_entropy)
                if self.engine is not None:
                    self.engine.backward(out.loss)  # scales by 1 / grad_accum_steps itself
                    self.engine.step()  # updates at the last micro-batch only
                else:
                    (out.loss / t.grad_accum_steps).backward()
                total += out.loss.detach() / t.grad_accum_steps
        if self.engine is not None:
            return self._zero_step(out, total, lr)
        finalize_grads(self.model, self.topo)
        grad_norm = global_grad_norm(self.params, self.topo)
        ok = all_ranks_agree(bool(torch.isfinite(total) & torch.isfinite(grad_norm)), self.topo,
                             self.device)
        if ok:
            if self.cfg.optim.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.cfg.optim.grad_clip,
                                                     grad_norm)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._after_step(ok)
        return out, total, grad_norm, lr, ok

    def _zero_step(self, out, total, lr):
        """The end of a step under ZeRO: DeepSpeed reduced, clipped and stepped (or skipped a
        step whose gradients were not finite)."""
        if self.pipeline is not None:
            self.engine.allreduce_gradients()
            self.engine.step()
        ok = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        grad_norm = torch.as_tensor(float("nan") if norm is None or not ok else float(norm))
        self._after_step(ok)
        return out, total, grad_norm, lr, ok

    def _after_step(self, ok: bool) -> None:
        if ok:
            self.bad_streak = 0
        else:
            self.skipped += 1
            self.bad_streak += 1
        self.step += 1
        if self.bad_streak >= self.cfg.train.max_bad_steps:
            raise TrainingDiverged(f"train.max_bad_steps: {self.bad_streak} consecutive steps had "
                                   f"a non-finite loss or gradient (last at step {self.step})")

    def _stats(self, out, total, grad_norm, lr, tokens_per_s) -> StepStats:
        """Statistics of the step (from the last pipeline stage), averaged over DP ranks."""
        r = self.cfg.model.loops
        mine = None if out is None else torch.cat((
            total.view(1), out.ce, out.exit_prob, out.gate, out.expected_loops.view(1),
            out.entropy.view(1)))
        packed = replica_stats(mine, 3 * r + 3, self.topo)
        loss, ce, exit_prob, gate = packed[0], packed[1:1 + r], packed[1 + r:1 + 2 * r], \
            packed[1 + 2 * r:1 + 3 * r]
        return StepStats(
            step=self.step, loss=loss.item(), ce=ce.tolist(), exit_prob=exit_prob.tolist(),
            gate=gate.tolist(), expected_loops=packed[-2].item(),
            entropy=packed[-1].item(), lr=lr, grad_norm=grad_norm.item(),
            tokens_per_s=tokens_per_s, skipped=self.skipped,
            data_skips=getattr(self.data, "skipped_samples", 0))

    def _report(self, s: StepStats) -> None:
        ce = " ".join(f"{c:.3f}" for c in s.ce)
        self.log(f"step {s.step:>6}/{self.cfg.train.max_steps} | loss {s.loss:.4f} | ce/loop {ce} "
                 f"| E[loops] {s.expected_loops:.2f} | lr {s.lr:.2e} | gnorm {s.grad_norm:.3f} "
                 f"| {s.tokens_per_s:,.0f} tok/s | skipped {s.skipped} steps {s.data_skips} samples")
        if self.writer is None:
            return
        w, n = self.writer, s.step
        for name in ("loss", "expected_loops", "lr", "grad_norm", "tokens_per_s"):
            w.add_scalar(f"train/{name}", getattr(s, name), n)
        w.add_scalar("train/gate_entropy", s.entropy, n)
        w.add_scalar("train/skipped_steps", s.skipped, n)
        w.add_scalar("data/skipped_samples", s.data_skips, n)
        if self.pipeline is not None and self.pipeline.wall_s > 0:  # this rank's idle share
            w.add_scalar("pipeline/idle_fraction", 1 - self.pipeline.busy_s / self.pipeline.wall_s, n)
        for i, (c, p, g) in enumerate(zip(s.ce, s.exit_prob, s.gate, strict=True), start=1):
            w.add_scalar(f"loop/ce_step{i}", c, n)
            w.add_scalar(f"loop/exit_prob_step{i}", p, n)
            w.add_scalar(f"loop/gate_step{i}", g, n)

    def fit(self, save: bool = True) -> RunSummary:
        t = self.cfg.train
        if self.topo.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        history: list[StepStats] = []
        tick, done = time.perf_counter(), 0
        while self.step < t.max_steps:
            out, total, grad_norm, lr, _ = self.train_step()
            done += 1
            if self.step % t.log_every == 0 or self.step == t.max_steps:
                now = time.perf_counter()
                stats = self._stats(out, total, grad_norm, lr,
                                    done * self.tokens_per_step / max(now - tick, 1e-9))
                history.append(stats)
                self._report(stats)
                tick, done = time.perf_counter(), 0
        ckpt = None
        if save:
            state = (full_state_dict(self.model, self.topo) if self.topo.tp > 1
                     else self.model.state_dict())
            if self.pipeline is not None:
                state = gather_stages(self.model, state, self.topo)
            if self.topo.is_main:
                ckpt = save_model(self.out_dir / "checkpoints", self.step, state, self.cfg)
        if self.writer is not None:
            self.writer.close()
        return RunSummary(self.step, history[-1].loss, self.skipped, ckpt, self.tb_dir, history)
