"""The console line per log interval, with the time left at the mean pace so far."""

from __future__ import annotations

import time

from pretrain.callbacks import Callback
from pretrain.model.generate import ExitRule


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


class Console(Callback):
    name = "console"

    def __init__(self, log):
        self.log = log
        self.start = time.perf_counter()
        self.first_step = 0

    def on_fit_start(self, trainer) -> None:
        self.start, self.first_step = time.perf_counter(), trainer.step

    def on_log(self, trainer, step: int, m) -> None:
        if not trainer.topo.is_main:
            return
        if m.kind == "validation":
            exits = " ".join(f"{rule} {m[f'val/ce_exit_{rule}']:.3f}" for rule in
                             map(str, map(ExitRule.parse, trainer.cfg.train.eval_exits)))
            self.log(f"step {step:>6} | val loss {m['val/loss']:.4f} | val ce/loop "
                     f"{_per_step(m, 'val/ce_step', trainer)} | exit ce {exits}")
        elif m.kind == "downstream":
            self.log(f"step {step:>6} | downstream " + " | ".join(f"{k} {v:.4f}" for k, v in m.items()))
        else:
            self._train_line(trainer, step, m)

    def _train_line(self, trainer, step: int, m) -> None:
        done = step - self.first_step
        left = (time.perf_counter() - self.start) / max(done, 1) * (trainer.cfg.train.max_steps - step)
        self.log(f"step {step:>6}/{trainer.cfg.train.max_steps} | loss {m['train/loss']:.4f} | "
                 f"{_loops(m, trainer)} | E[loops] {m['train/expected_loops']:.2f}"
                 f" | lr {m['train/lr']:.2e} | gnorm {m['train/grad_norm']:.3f} | "
                 f"{m['train/tokens_per_s']:,.0f} tok/s | MFU {_mfu(m)} | mem {_memory(m)}"
                 f" | skipped {m['train/skipped_steps']:.0f} steps "
                 f"{m['data/skipped_samples']:.0f} samples | ETA {_duration(left)}")


def _mfu(m: dict[str, float]) -> str:
    return f"{100 * m['train/mfu']:.1f}%" if "train/mfu" in m else "unknown"


def _memory(m: dict[str, float]) -> str:
    """Peak allocated; on CUDA also the allocator's reserved peak and the least free memory."""
    out = f"{m['train/peak_memory_gb']:.2f} GB"
    if "train/peak_reserved_gb" in m:
        out += f" (reserved {m['train/peak_reserved_gb']:.2f}, free {m['train/free_memory_gb']:.2f})"
    return out


def _loops(m: dict[str, float], trainer) -> str:
    """CE per loop step; with R drawn or grown, R, its backprop window and the last CE."""
    if not trainer.recurrence.varies:
        return f"ce/loop {_per_step(m, 'loop/ce_step', trainer)}"
    return (f"R {m['train/loops']:.0f} (grad {m['train/backprop_loops']:.0f}) | ce last "
            f"{m['loop/ce_last']:.3f}")


def _per_step(m: dict[str, float], prefix: str, trainer) -> str:
    return " ".join(f"{m[f'{prefix}{t}']:.3f}" for t in range(1, trainer.cfg.model.loops + 1))
