"""Single-process trainer: AdamW, lr schedule, clipping, accumulation, NaN skipping, logging.

The step loop is kept thin on purpose: everything per-step is tensors, and host syncs happen
once per step (the finite check) and once per log interval, so the trainer costs little over a
bare PyTorch loop (see bench/overhead.py).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from data_pipeline.loader import RankSpec, StreamingData
from parallelism.grads import (
    all_ranks_agree,
    finalize_grads,
    global_grad_norm,
    layer_grad_norms,
    replica_stats,
)
from parallelism.pipeline import PipelineStage, keep_stage
from parallelism.pipeline_balance import describe, resolve_split
from parallelism.sharded_state import ShardedState
from parallelism.tensor_parallel import parallelize_tensor, vocab_parallel_token_ce
from parallelism.topology import Topology, init_topology
from parallelism.zero import build_zero_engine
from pretrain import __version__
from pretrain.checkpoint import store
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.compat import incompatibility
from pretrain.checkpoint.offline import saved_tensors
from pretrain.config import Config, ConfigError, dump_config, load_config
from pretrain.data import ByteTokenizer, TextData, TokenWindows, load_text_tokens
from pretrain.hardware import peak_flops, peak_memory_bytes
from pretrain.model.flops import run_flops_per_token
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import (
    compute_objective,
    readout_steps,
    token_cross_entropy,
    trains_gate,
)
from pretrain.optim import build_optimizer, lr_at, param_groups, set_lr
from pretrain.preemption import Preempted, PreemptionSignal


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
    mfu: float = 0.0  # model FLOPs / (time x peak FLOP/s of every device)
    peak_memory_gb: float = 0.0  # the largest peak over all ranks
    hidden_norm: list[float] = field(default_factory=list)  # mean |x_t| per loop (FLT's plot)
    layer_grad_norm: list[float] = field(default_factory=list)  # per shared-block layer


@dataclass
class RunSummary:
    steps: int
    final_loss: float
    skipped_steps: int
    checkpoint: Path | None
    tensorboard_dir: Path
    history: list[StepStats] = field(default_factory=list)


def summary_table(history: list[StepStats], tokens_per_step: int) -> str:
    """The end-of-run table: what the run did, on average and at its end."""
    last = history[-1]
    n = len(history)
    rows = [("steps", f"{last.step:,}"), ("tokens", f"{last.step * tokens_per_step:,}"),
            ("final loss", f"{last.loss:.4f}"),
            ("CE per loop step", " ".join(f"{c:.3f}" for c in last.ce)),
            ("E[loops]", f"{last.expected_loops:.2f}"),
            ("tokens/s (mean)", f"{sum(s.tokens_per_s for s in history) / n:,.0f}"),
            ("MFU (mean)", f"{100 * sum(s.mfu for s in history) / n:.1f}%"),
            ("peak memory / rank", f"{max(s.peak_memory_gb for s in history):.2f} GB"),
            ("skipped steps", str(last.skipped)), ("skipped samples", str(last.data_skips))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


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
        self.pipeline, self.split = None, []
        if self.topo.pp > 1:
            self.split = resolve_split(cfg)
            keep_stage(model, self.split, self.topo.pp_rank)
            self.pipeline = PipelineStage(model, self.topo, cfg, self.cross_entropy)
            self.log(f"pipeline split ({'explicit' if cfg.parallel.pipeline_split else 'auto'}): "
                     f"{describe(cfg, self.split)}")
        self.model = model.to(self.device)
        if cfg.objective.kind == "adaptive_gate":  # stage 2: LM frozen, only the gate learns
            for name, p in self.model.named_parameters():
                p.requires_grad_(name.startswith("gate."))
        elif not trains_gate(cfg.objective.kind):  # the FLT objectives leave the gate alone
            for name, p in self.model.named_parameters():
                p.requires_grad_(not name.startswith("gate."))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.engine = None  # DeepSpeed ZeRO: it reduces, clips and steps
        if cfg.parallel.zero_stage:
            self.engine = build_zero_engine(self.model, param_groups(self.model, cfg.optim), cfg,
                                            self.topo, pipeline=self.pipeline is not None)
            self.optimizer = self.engine.optimizer
        else:
            self.optimizer = build_optimizer(self.model, cfg.optim)
        self.data = data if data is not None else default_data(cfg, self.topo)
        self.state = ShardedState(self.model, self.topo,
                                  None if self.engine else self.optimizer, self.engine)
        self._batches = None  # the data's micro-batch iterator, opened on the first step
        self.out_dir = Path(cfg.train.out_dir)
        self.tb_dir = self.out_dir / "tensorboard"
        self.writer = None
        if tensorboard and self.topo.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir))
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.topo,
                                         cfg.train.keep_last, cfg.train.async_checkpoint, self.log)
        self.saved_step = -1
        self.preemption = PreemptionSignal()
        self.heads = readout_steps(cfg.objective.kind, cfg.model.loops)
        self.flops_per_token = run_flops_per_token(cfg)
        self.peak_flops = peak_flops(self.device, cfg.train.peak_flops) * self.topo.world
        self.step = 0
        self.layer_grad_norms: list[float] = []  # at log steps (not under ZeRO: it owns the grads)
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
                    out = compute_objective(self.cfg.objective,
                                            self.model(inputs, heads=self.heads), labels,
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
        if self._logs_after_this_step():
            self.layer_grad_norms = layer_grad_norms(self.model, self.topo, self.cfg.model.num_layers)
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

    def _logs_after_this_step(self) -> bool:
        t = self.cfg.train
        return (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps

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
            total.view(1), out.ce, out.exit_prob, out.gate, out.hidden_norm.to(total.device),
            out.expected_loops.view(1), out.entropy.view(1)))
        packed = replica_stats(mine, 4 * r + 3, self.topo)
        loss, ce, exit_prob, gate, hidden = packed[0], packed[1:1 + r], packed[1 + r:1 + 2 * r], \
            packed[1 + 2 * r:1 + 3 * r], packed[1 + 3 * r:1 + 4 * r]
        memory = torch.tensor([float(peak_memory_bytes(self.device))], device=self.device)
        if self.topo.world > 1:
            dist.all_reduce(memory, op=dist.ReduceOp.MAX)
        return StepStats(
            step=self.step, loss=loss.item(), ce=ce.tolist(), exit_prob=exit_prob.tolist(),
            gate=gate.tolist(), expected_loops=packed[-2].item(),
            entropy=packed[-1].item(), lr=lr, grad_norm=grad_norm.item(),
            tokens_per_s=tokens_per_s, skipped=self.skipped,
            data_skips=getattr(self.data, "skipped_samples", 0),
            mfu=self.flops_per_token * tokens_per_s / self.peak_flops,
            peak_memory_gb=memory.item() / 2**30, hidden_norm=hidden.tolist(),
            layer_grad_norm=self.layer_grad_norms)

    def _report(self, s: StepStats) -> None:
        if self.topo.is_main:  # the machine-readable log (`pretrain status`, resume tests)
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps({**asdict(s), "time": time.time()}) + "\n")
        ce = " ".join(f"{c:.3f}" for c in s.ce)
        self.log(f"step {s.step:>6}/{self.cfg.train.max_steps} | loss {s.loss:.4f} | ce/loop {ce} "
                 f"| E[loops] {s.expected_loops:.2f} | lr {s.lr:.2e} | gnorm {s.grad_norm:.3f} "
                 f"| {s.tokens_per_s:,.0f} tok/s | MFU {100 * s.mfu:.1f}% | mem {s.peak_memory_gb:.2f} GB "
                 f"| skipped {s.skipped} steps {s.data_skips} samples")
        if self.writer is None:
            return
        w, n = self.writer, s.step
        for name in ("loss", "expected_loops", "lr", "grad_norm", "tokens_per_s", "mfu",
                     "peak_memory_gb"):
            w.add_scalar(f"train/{name}", getattr(s, name), n)
        w.add_scalar("train/gate_entropy", s.entropy, n)
        w.add_scalar("train/skipped_steps", s.skipped, n)
        w.add_scalar("data/skipped_samples", s.data_skips, n)
        if self.pipeline is not None and self.pipeline.wall_s > 0:  # this rank's idle share
            w.add_scalar("pipeline/idle_fraction", 1 - self.pipeline.busy_s / self.pipeline.wall_s, n)
        for i, (c, p, g, hn) in enumerate(zip(s.ce, s.exit_prob, s.gate, s.hidden_norm,
                                                  strict=True), start=1):
            w.add_scalar(f"loop/ce_step{i}", c, n)
            w.add_scalar(f"loop/exit_prob_step{i}", p, n)
            w.add_scalar(f"loop/gate_step{i}", g, n)
            w.add_scalar(f"loop/hidden_norm_step{i}", hn, n)
        for i, gn in enumerate(s.layer_grad_norm):
            w.add_scalar(f"grad_norm/block_layer{i}", gn, n)

    def _meta(self) -> dict:
        """The global record of a checkpoint (what no tensor holds)."""
        c, t = self.cfg, self.topo
        data = self.data.state_dict()
        return {"format": 1, "step": self.step, "data": data,
                "tokens": data.get("samples_consumed", 0) * c.train.seq_len,
                "trainer": {"skipped": self.skipped, "bad_streak": self.bad_streak},
                "layout": {"tensor": t.tp, "pipeline": t.pp, "data": t.dp,
                           "zero_stage": c.parallel.zero_stage, "pipeline_split": self.split},
                "seed": c.train.seed, "lr": lr_at(c.optim, self.step, c.train.max_steps),
                "code_version": __version__, "torch": torch.__version__, "time": time.time(),
                "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}

    def save_checkpoint(self) -> None:
        """A sharded checkpoint of this step (in the background with train.async_checkpoint)."""
        self.checkpointer.save(self.step, self.state.state_dict(), self._meta(),
                               dump_config(self.cfg))
        self.saved_step = self.step

    def resume(self, where: str) -> Path | None:
        """Continue from a checkpoint: 'auto' (this run's newest complete one, if any) or a
        path. Any saved layout loads; the RNG state only under the same layout."""
        path = store.newest(self.checkpointer.root) if where == "auto" else store.resolve(where)
        if path is not None:
            why = incompatibility(load_config(path / "config.yaml"), self.cfg)
            if why:
                raise store.CheckpointError(f"{path}: incompatible checkpoint: {why}")
            meta = store.read_meta(path)
            groups = self.state.targets(saved_tensors(path))
            self.checkpointer.load(path, {k: v for g in groups.values() for k, v in g.items()})
            lay = meta["layout"]
            same = (lay["tensor"], lay["pipeline"], lay["data"]) == (self.topo.tp, self.topo.pp,
                                                                    self.topo.dp)
            self.state.load(groups, same_layout=same)
            self.step = self.saved_step = meta["step"]
            self.checkpointer.last = path
            self.skipped, self.bad_streak = meta["trainer"]["skipped"], meta["trainer"]["bad_streak"]
            self.data.load_state_dict(meta["data"])
            self._batches = None
            self.log(f"resumed from {path} at step {self.step} (saved under tensor {lay['tensor']} "
                     f"x pipeline {lay['pipeline']} x data {lay['data']})")
        self.checkpointer.clean_incomplete()
        return path

    def fit(self, save: bool = True) -> RunSummary:
        t = self.cfg.train
        if self.topo.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(dump_config(self.cfg))
        history: list[StepStats] = []
        tick, done = time.perf_counter(), 0
        self.preemption.install()
        try:
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
                if self.preemption.agreed(self.device):
                    self.save_checkpoint()
                    where = self.checkpointer.wait()
                    raise Preempted(f"preempted (signal {self.preemption.received or 'on a peer'})"
                                    f": checkpoint {where} at step {self.step}")
                if save and t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                        and self.step < t.max_steps:
                    self.save_checkpoint()
            if save and self.saved_step != self.step:
                self.save_checkpoint()
            ckpt = self.checkpointer.wait() if save else None
        finally:
            self.preemption.uninstall()
            self.checkpointer.close()
            if self.writer is not None:
                self.writer.close()
        final = history[-1].loss if history else float("nan")
        if history:
            self.log(summary_table(history, self.tokens_per_step))
        return RunSummary(self.step, final, self.skipped, ckpt, self.tb_dir, history)
