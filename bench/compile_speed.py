"""Compiled vs eager decoder layers (`train.compile`): tokens/s and loss, side by side on CPU.

Two trainers over the same config and data, one with `train.compile=true` (torch.compile,
CPU inductor, one graph for every layer and loop), alternate rounds of steps in this one
process after a warm-up (the compile) so machine noise hits both alike; the ratio of the
median step times is printed with the largest loss difference.

    python -m bench.compile_speed [--rounds K] [--steps N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.overhead import CONFIGS
from pretrain.config import load_config
from pretrain.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def trainer(compiled: bool, steps: int, out: str) -> Trainer:
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *CONFIGS["50m"], f"train.max_steps={steps}", "optim.warmup_steps=0",
        f"train.compile={str(compiled).lower()}", f"train.out_dir={out}"])
    return Trainer(cfg, log=None, tensorboard=False)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    total = 1 + args.rounds * args.steps
    out = tempfile.mkdtemp()
    runs = {name: trainer(name == "compiled", total, out) for name in ("eager", "compiled")}
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, list[float]] = {name: [] for name in runs}
    t0 = time.perf_counter()
    for name, t in runs.items():  # warm-up: the compile happens here
        losses[name].append(float(t.train_step().loss))
    print(f"warm-up step (compile included): {time.perf_counter() - t0:.1f} s for both")
    for _ in range(args.rounds):
        for name, t in runs.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                losses[name].append(float(t.train_step().loss))
                times[name].append(time.perf_counter() - start)
    tokens = runs["eager"].tokens_per_step
    eager, compiled = (statistics.median(times[n]) for n in ("eager", "compiled"))
    pairs = list(zip(losses["eager"], losses["compiled"], strict=True))
    first = abs(pairs[0][0] - pairs[0][1]) / pairs[0][0]  # same weights: numerics alone
    diff = max(abs(a - b) / a for a, b in pairs)
    print(f"50m config, {torch.get_num_threads()} threads: eager {tokens / eager:,.0f} tok/s, "
          f"compiled {tokens / compiled:,.0f} tok/s -> compiled / eager {eager / compiled:.2f}")
    print(f"relative loss difference: first step {first:.1e} (goal <= 1e-5), largest over "
          f"{total} steps {diff:.1e} (the runs part as rounding differences compound)")


if __name__ == "__main__":
    main()
