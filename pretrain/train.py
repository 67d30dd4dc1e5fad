"""The trainer: a straight line of steps; the layout lives in the step engine, every output
in a callback.

    build model (from the seed) -> build_engine (TP / pipeline stage, optimizer, ZeRO)
    per step: lr -> engine.train_step(micro-batches) -> skip accounting -> callbacks.on_step_end
              (checkpointing, preemption, validation), and every log_every steps the named
              statistics, reduced in one collective, go to callbacks.on_log

Host syncs happen once per step (the finite check) and once per log interval, so the trainer
costs little over a bare PyTorch loop (bench/overhead.py).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from core.durable import open_no_link
from parallelism.sharded_state import ShardedState
from parallelism.stats import Metrics
from parallelism.topology import Topology, init_topology
from pretrain import __version__
from pretrain.callbacks import Callback, Logged, default_callbacks
from pretrain.callbacks.checkpointing import Checkpointing
from pretrain.checkpoint import store
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.compat import Incompatible, config_changes, require_fit, resume_points
from pretrain.checkpoint.offline import saved_tensors
from pretrain.checkpoint.record import make_record, trainer_state
from pretrain.config import Config, dump_config
from pretrain.data import default_data
from pretrain.model.flops import run_flops_per_token
from pretrain.model.looped import LoopedLM
from pretrain.model.recurrence import Recurrence
from pretrain.optim import lr_at, set_lr, warmup_notice
from pretrain.planning.hardware import memory_gb, peak_flops
from pretrain.run.run_dir import RunLock
from pretrain.step_engine import build_engine


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


@dataclass
class RunSummary:
    steps: int
    final_loss: float
    skipped_steps: int
    checkpoint: Path | None
    tensorboard_dir: Path
    history: list[dict[str, float]] = field(default_factory=list)  # "step" + the logged names


def step_lr(cfg: Config, step: int) -> float:
    """The learning rate of training step `step`: the schedule's, times a loop-growth re-warm."""
    return lr_at(cfg.optim, step, cfg.train.max_steps) * Recurrence.of(cfg).lr_factor(step)


def summary_table(history: list[dict[str, float]], tokens_per_step: int, loops: int) -> str:
    """The end-of-run table: what the run did, on average and at its end."""
    last = history[-1]
    n = len(history)

    def mean(name: str) -> float:
        return sum(h[name] for h in history) / n

    rows = [("steps", f"{last['step']:,}"), ("tokens", f"{last['step'] * tokens_per_step:,}"),
            ("final loss", f"{last['train/loss']:.4f}"),
            ("CE per loop step", " ".join(f"{last[f'loop/ce_step{t}']:.3f}"
                                          for t in range(1, loops + 1))) if "loop/ce_step1" in last
            else ("CE at the last loop step", f"{last['loop/ce_last']:.3f}"),
            ("E[loops]", f"{last['train/expected_loops']:.2f}"),
            ("tokens/s (mean)", f"{mean('train/tokens_per_s'):,.0f}"),
            ("MFU (mean)", f"{100 * mean('train/mfu'):.1f}%" if "train/mfu" in last else "unknown"),
            ("peak memory / rank", f"{max(h['train/peak_memory_gb'] for h in history):.2f} GB"),
            ("skipped steps", f"{last['train/skipped_steps']:.0f}"),
            ("skipped samples", f"{last['data/skipped_samples']:.0f}")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["summary"] + [f"  {k:<{width}}  {v}" for k, v in rows])


class Trainer:
    """Trains this process's share of the layout. `log` (None: silent) and `tensorboard` pick
    the default outputs (callbacks/__init__.py `default_callbacks`); `callbacks` are added;
    `preemption`: signal handlers the caller installed before building the trainer."""

    def __init__(self, cfg: Config, model: nn.Module | None = None, data=None,
                 log=print, tensorboard: bool = True, topology: Topology | None = None,
                 callbacks: list[Callback] = (), preemption=None):
        self.cfg = cfg
        self.topo = topology or init_topology(cfg)
        self.log = log if (self.topo.is_main and log is not None) else (lambda _: None)
        self.device = self.topo.device
        torch.manual_seed(cfg.train.seed)
        self.engine = build_engine(cfg, model if model is not None else LoopedLM(cfg.model),
                                   self.topo, self.log)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.data = data if data is not None else default_data(cfg, self.topo)
        zero = self.engine.zero
        self.state = ShardedState(self.model, self.topo, None if zero else self.optimizer, zero)
        self._batches = None  # the data's micro-batch iterator, opened on the first step
        self.out_dir = Path(cfg.train.out_dir)
        self.callbacks = [*default_callbacks(cfg, log, tensorboard, preemption), *callbacks]
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", self.topo,
                                         cfg.train.keep_last, cfg.train.async_checkpoint, self.log)
        self.saved_step = -1
        self.run_lock: RunLock | None = None  # the CLI's, else taken by fit() while it saves
        self.recurrence = Recurrence.of(cfg)
        self._flops: dict[int, float] = {}  # FLOPs per token by growth phase (its R)
        peak, why = peak_flops(self.device, cfg.train.peak_flops)
        self.peak_flops = None if peak is None else peak * self.topo.world  # None: MFU unknown
        if peak is None:
            self.log(why)
        self.step = 0
        self.skipped = 0
        self.bad_streak = 0
        self.history: list[dict[str, float]] = []
        notice = warmup_notice(cfg.optim, cfg.train.max_steps)
        if notice:
            self.log(notice)

    def flops_per_token(self, step: int) -> float:
        """Training FLOPs per token of step `step` (of its growth phase)."""
        phase = self.recurrence.loops_at(step)
        if phase not in self._flops:
            self._flops[phase] = run_flops_per_token(self.cfg, step)
        return self._flops[phase]

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one global batch (all data-parallel ranks)."""
        t = self.cfg.train
        return t.micro_batch_size * t.grad_accum_steps * t.seq_len * self.topo.dp

    def train_step(self):
        """One optimizer step over grad_accum_steps micro-batches (step_engine.py); returns
        the step's result (objective output, loss, grad norm, applied or skipped)."""
        t = self.cfg.train
        set_lr(self.optimizer, step_lr(self.cfg, self.step))
        if self._batches is None:
            self._batches = self.data.batches()
        batches = [tuple(x.to(self.device) for x in next(self._batches))
                   for _ in range(t.grad_accum_steps)]
        result = self.engine.train_step(batches, self.step, diagnostics=self._logs_after_this_step())
        if result.ok:
            self.bad_streak = 0
        else:
            self.skipped += 1
            self.bad_streak += 1
        self.step += 1
        if self.bad_streak >= t.max_bad_steps:
            raise TrainingDiverged(f"train.max_bad_steps: {self.bad_streak} consecutive steps had "
                                   f"a non-finite loss or gradient (last at step {self.step})")
        return result

    def _logs_after_this_step(self) -> bool:
        t = self.cfg.train
        return (self.step + 1) % t.log_every == 0 or self.step + 1 == t.max_steps

    def _step_metrics(self, result, tokens_per_s: float) -> dict[str, float]:
        """The step's metrics by name (parallelism/stats.py), reduced in one collective: the
        objective's on the last pipeline stage (None elsewhere), the rest on every rank."""
        out, r, m = result.out, self.cfg.model.loops, Metrics()
        m.record("train/loss", None if out is None else result.loss)
        m.record("train/expected_loops", None if out is None else out.expected_loops)
        m.record("train/gate_entropy", None if out is None else out.entropy)
        if not self.recurrence.varies:
            for name in ("ce", "exit_prob", "gate", "hidden_norm"):  # ObjectiveOutput's [R] fields
                m.record(f"loop/{name}_step", None if out is None else getattr(out, name),
                         shape=(r,), steps=True)
        else:  # R drawn or grown: its value, the window and the last step's CE
            m.record("loop/ce_last", None if out is None else out.ce[-1])
            m.record("train/loops", result.plan.loops, "max")
            m.record("train/backprop_loops", result.plan.backprop, "max")
        # data skips: each replica's own samples, counted once per replica (the last stage)
        m.record("data/skipped_samples",
                 None if out is None else getattr(self.data, "skipped_samples", 0), "sum")
        for name, gib in memory_gb(self.device).items():
            m.record(f"train/{name}", gib, "min" if name.startswith("free") else "max")
        # the same on every rank (the norm is global, ranks skip together): max keeps it
        m.record("train/lr", step_lr(self.cfg, self.step - 1), "max")
        m.record("train/grad_norm", result.grad_norm, "max")
        m.record("train/tokens_per_s", tokens_per_s, "max")
        if self.peak_flops is not None:
            m.record("train/mfu", self.flops_per_token(self.step - 1) * tokens_per_s
                     / self.peak_flops, "max")
        m.record("train/skipped_steps", self.skipped, "max")
        for name, value in self.model.family.metrics(self.model).items():
            m.record(name, value, "max")
        for i, g in enumerate(result.layer_grad_norms or []):
            m.record(f"grad_norm/block_layer{i}", g, "max")
        pipe = self.engine.pipeline
        if pipe is not None:  # every stage's share of the step spent waiting, averaged
            m.record("pipeline/idle_fraction",
                     1 - pipe.busy_s / pipe.wall_s if pipe.wall_s > 0 else 0.0)
        return m.named(m.reduce(self.topo))

    # -- the surface callbacks use (callbacks/__init__.py) ------------------------------------
    def evaluate(self, batches, readout) -> list | None:
        """`readout(LoopedOutput, labels)` of every micro-batch under this layout, forward only
        (None off the last pipeline stage)."""
        return self.engine.evaluate(batches, readout)

    def objective(self, out, labels, cross_entropy=None):
        """The run's objective of a LoopedOutput (`cross_entropy`: step_engine.py)."""
        return self.engine.objective(out, labels, cross_entropy)

    @property
    def cross_entropy(self):
        """The layout's per-token CE (vocab-parallel under TP)."""
        return self.engine.cross_entropy

    def emit(self, metrics: dict[str, float], kind: str = "train") -> None:
        """Hand metrics of the current step to every callback, as `Logged` of `kind` (train,
        validation, downstream); validation's also to on_eval."""
        logged = Logged(metrics, kind)
        for cb in self.callbacks:
            cb.on_log(self, self.step, logged)
            if kind == "validation":
                cb.on_eval(self, self.step, logged)

    def state_dict(self) -> dict:
        """What a resumed run needs that no tensor holds: the step, the skip counters, the
        data position and every callback's state (`load_state_dict` takes exactly this)."""
        return {"step": self.step, "skipped": self.skipped, "bad_streak": self.bad_streak,
                "data": self.data.state_dict(),
                "callbacks": {cb.name: cb.state_dict() for cb in self.callbacks}}

    def load_state_dict(self, state: dict) -> None:
        self.step = self.saved_step = state["step"]
        self.skipped, self.bad_streak = state["skipped"], state["bad_streak"]
        for cb in self.callbacks:
            cb.load_state_dict(state["callbacks"].get(cb.name, {}))
        self.data.load_state_dict(state["data"])
        self._batches = None

    def _record(self) -> dict:
        """The checkpoint's record (checkpoint/record.py): the trainer state and provenance."""
        c, t = self.cfg, self.topo
        state = self.state_dict()
        layout = {"tensor": t.tp, "pipeline": t.pp, "data": t.dp,
                  "zero_stage": c.parallel.zero_stage, "pipeline_split": self.engine.split}
        return make_record(state, state["data"].get("samples_consumed", 0) * c.train.seq_len,
                           layout, seed=c.train.seed,
                           lr=step_lr(c, self.step),
                           code_version=__version__, torch=torch.__version__, time=time.time(),
                           slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", 0)))

    def save_checkpoint(self) -> None:
        """A sharded checkpoint of this step (in the background with train.async_checkpoint)."""
        self.checkpointer.save(self.step, self.state.state_dict(), self._record(),
                               dump_config(self.cfg))
        self.saved_step = self.step
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.step)

    def wait_for_checkpoint(self) -> Path | None:
        """Block until the last checkpoint is sealed; its directory (None: none was written)."""
        return self.checkpointer.wait()

    def checkpoint_dir(self, step: int) -> Path:
        return store.step_dir(self.checkpointer.root, step)

    def resume(self, where: str) -> Path | None:
        """Continue from a checkpoint: 'auto' (this run's newest complete one, if any; past a
        damaged one to the one before, saying so) or a path as users type it
        (checkpoint/compat.py `resume_points`). Any saved layout loads; the RNG state only
        under the same layout."""
        candidates = resume_points(where, self.checkpointer.root)
        if not candidates:
            self.log(f"resume: no complete checkpoint under {self.checkpointer.root}: starting "
                     "at step 0")
        damaged: list[Path] = []
        path = None
        for path in candidates:
            try:
                self._load(path)
                break
            except store.CheckpointError as e:
                if path == candidates[-1] or isinstance(e, Incompatible):
                    raise
                self.log(f"checkpoint: warning: {e}; falling back to the one before")
                damaged.append(path)
        self.checkpointer.tidy(path, damaged)
        return path

    def _load(self, path: Path) -> None:
        saved = require_fit(path, self.cfg)
        record = store.read_meta(path)
        groups = self.state.targets(saved_tensors(path))
        self.checkpointer.load(path, {k: v for g in groups.values() for k, v in g.items()})
        lay = record["layout"]
        same = (lay["tensor"], lay["pipeline"], lay["data"]) == (self.topo.tp, self.topo.pp,
                                                                self.topo.dp)
        self.state.load(groups, same_layout=same)
        self.load_state_dict(trainer_state(record, str(path / store.META)))
        self.checkpointer.last = path
        self.log(f"resumed from {path} at step {self.step} (saved under tensor {lay['tensor']} "
                 f"x pipeline {lay['pipeline']} x data {lay['data']})")
        self._say_what_changes(saved)

    def _say_what_changes(self, saved: Config) -> None:
        """One line per kind of change this run makes to the checkpoint's run: its config
        values, and the learning rate where the schedule is recomputed."""
        changed = config_changes(saved, self.cfg)
        if changed:
            self.log(f"resume: this run's config differs from the checkpoint's: {'; '.join(changed)}")
        before, now = step_lr(saved, self.step), step_lr(self.cfg, self.step)
        if not math.isclose(before, now, rel_tol=1e-6, abs_tol=1e-12):
            self.log(f"resume: the learning rate schedule is recomputed: lr at step {self.step} "
                     f"is {now:.3g} (the checkpoint's schedule: {before:.3g})")

    def fit(self, save: bool = True) -> RunSummary:
        """Train to train.max_steps; `save=False` runs without the checkpointing callback.
        A run that saves holds train.out_dir's lock (pretrain/run/run_dir.py) while it trains: the
        caller's (`run_lock`, the CLI's), else its own."""
        t = self.cfg.train
        if not save:
            self.callbacks = [cb for cb in self.callbacks if not isinstance(cb, Checkpointing)]
        own_lock = save and self.topo.is_main and self.run_lock is None
        if own_lock:
            self.run_lock = RunLock(self.out_dir)
            self.run_lock.acquire()
        if self.topo.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open_no_link(self.out_dir / "config.yaml") as fh:
                fh.write(dump_config(self.cfg))
        tick, done = time.perf_counter(), 0
        try:
            for cb in self.callbacks:
                cb.on_fit_start(self)
            while self.step < t.max_steps:
                result = self.train_step()
                done += 1
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    metrics = self._step_metrics(result, done * self.tokens_per_step
                                                 / max(time.perf_counter() - tick, 1e-9))
                    self.history.append({"step": self.step, **metrics})
                    self.emit(metrics)
                    tick, done = time.perf_counter(), 0
                for cb in self.callbacks:
                    cb.on_step_end(self)
        finally:
            for cb in self.callbacks:
                cb.on_fit_end(self)
            ckpt = self.checkpointer.wait() if save else None
            self.checkpointer.close()
            if own_lock:
                self.run_lock.release()
                self.run_lock = None
        history = self.history
        if history:
            self.log(summary_table(history, self.tokens_per_step, self.cfg.model.loops))
        final = history[-1]["train/loss"] if history else float("nan")
        return RunSummary(self.step, final, self.skipped, ckpt, self.out_dir / "tensorboard",
                          history)
