"""Trainer overhead: tokens/s of the `pretrain train` step loop vs a bare PyTorch loop.

Both run in this one process over the same model object and the same batches, alternating
(trainer, bare, trainer, bare, ...) so machine noise hits both alike; the ratio of the medians
is printed. Goal: trainer / bare >= 0.95.

    python -m bench.overhead [--steps N] [--reps K] [--only tiny|50m]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.data import default_data
from pretrain.model.flops import count_parameters
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import compute_objective
from pretrain.train import Trainer

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    "tiny": [],
    "50m": ["model.hidden_size=640", "model.num_layers=10", "model.num_heads=10",
            "model.num_kv_heads=5", "model.ffn_hidden_size=1728", "model.loops=2",
            "train.seq_len=128", "train.micro_batch_size=2"],
}


def bare_loop(model, data, cfg, steps: int, first_step: int) -> float:
    """The reference: forward, objective, backward, clip, AdamW step. Returns seconds."""
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=(0.9, 0.95),
                            weight_decay=cfg.optim.weight_decay)
    start = time.perf_counter()
    for step in range(first_step, first_step + steps):
        for micro in range(t.grad_accum_steps):
            first = (step * t.grad_accum_steps + micro) * t.micro_batch_size
            inputs, labels = data.windows.batch(first, t.micro_batch_size)
            loss = compute_objective(cfg.objective, model(inputs), labels).loss
            (loss / t.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainer_loop(model, data, cfg) -> float:
    """`pretrain train`'s loop (schedule, finite checks, stats, console + TensorBoard logging)."""
    trainer = Trainer(cfg, model=model, data=data, log=lambda _: None)
    start = time.perf_counter()
    trainer.fit(save=False)
    return time.perf_counter() - start


def measure(name: str, steps: int, reps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/tiny.yaml",
                          [*CONFIGS[name], f"train.max_steps={steps}", "train.log_every=5",
                           "optim.warmup_steps=0", f"data.paths=[{ROOT / 'data/sample.txt'}]",
                           f"train.out_dir={tmp}"])
        data = default_data(cfg)
        torch.manual_seed(0)
        model = LoopedLM(cfg.model)
        bare_loop(model, data, cfg, 2, 0)  # warm up allocator and kernels
        tokens = steps * cfg.train.micro_batch_size * cfg.train.grad_accum_steps * cfg.train.seq_len
        rates = {"trainer": [], "bare": []}
        for _ in range(reps):
            rates["trainer"].append(tokens / trainer_loop(model, data, cfg))
            rates["bare"].append(tokens / bare_loop(model, data, cfg, steps, 0))
    n = count_parameters(cfg.model)["non_embedding"]
    tr, ba = statistics.median(rates["trainer"]), statistics.median(rates["bare"])
    print(f"{name:>5}: {n / 1e6:6.1f}M non-embedding params, R={cfg.model.loops}, "
          f"{steps} steps x {reps} reps | trainer {tr:10,.0f} tok/s | bare {ba:10,.0f} tok/s "
          f"| ratio {tr / ba:.3f}")
    return tr / ba


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=0, help="steps per rep (default per config)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=sorted(CONFIGS))
    args = ap.parse_args()
    for name in CONFIGS:
        if args.only in (None, name):
            measure(name, args.steps or (40 if name == "tiny" else 5), args.reps)


if __name__ == "__main__":
    main()
