"""Huginn's recipe in the framework: (a) what truncated backprop keeps, (b) the circular
pipeline's bubble with R drawn per step against an unrolled pipeline sized for the largest R.

Run: `python -m bench.sampled_recurrence` ((b) re-launches itself under torchrun, P = 2 gloo
processes, one thread each).

(a) Bytes saved for backward (model/memory.py `SavedForBackward`, one count per storage,
    weights excluded) of one micro-batch of a CPU-sized huginn model at R = 32 with gradients
    through the last k = 8, against full backprop at R = 32. Bound (issue 27): the ratio is at
    most k / R + the share of the full run's bytes outside the recurrence (embedding, prelude,
    coda, readout, loss), measured from R = 1 and R = 2 runs.
(b) Sampled R (mean 8, sigma 0.5), k = 4, m = 4 micro-batches, 2 shared layers over P = 2:
    schedule-derived -- circular (p - 1) / (R m + p - 1) per step over the drawn R; an
    unrolled pipeline must hold R_max (R's 99th percentile) recurrences as layers, so on a step
    drawing R only R / R_max of its stage-time does work -- and measured on the ring: each
    step's idle share of device time (1 - mean busy / wall) and its R.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from bench.torchrun_self import torchrun_self

ROOT = Path(__file__).resolve().parents[1]

P, M, STEPS = 2, 4, 10


def saved(cfg, loops: int, backprop: int) -> int:
    from pretrain.model.looped import LoopedLM
    from pretrain.model.memory import SavedForBackward
    from pretrain.model.objective import compute_objective

    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    ids = torch.randint(0, cfg.model.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    with SavedForBackward(model.parameters()) as c:
        out = model(ids, loops=loops, backprop=backprop, state_seed=1)
        compute_objective(cfg.objective, out, ids)
    return c.bytes


def activations() -> None:
    from pretrain.config import load_config

    cfg = load_config(ROOT / "configs/huginn-cpu.yaml")
    r, k = 32, 8
    full, trunc = saved(cfg, r, 0), saved(cfg, r, k)
    one, two = saved(cfg, 1, 0), saved(cfg, 2, 0)
    per_rec = two - one
    outside = full - r * per_rec
    bound = k / r + outside / full
    print(f"(a) R={r}, k={k}: full backprop {full / 2**20:.2f} MiB, truncated {trunc / 2**20:.2f} "
          f"MiB, ratio {trunc / full:.4f}; bound k/R + outside share = {k / r:.4f} + "
          f"{outside / full:.4f} = {bound:.4f}: {'met' if trunc / full <= bound + 1e-9 else 'MISSED'}")


def worker() -> None:
    from parallelism.topology import init_topology
    from pretrain.config import load_config
    from pretrain.model.recurrence import Recurrence
    from pretrain.train import Trainer

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/huginn-cpu.yaml", [
            f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={tmp}",
            f"parallel.pipeline={P}", f"train.grad_accum_steps={M}", "train.micro_batch_size=4",
            "model.tie_embeddings=false", "recurrence.backprop=4", "optim.warmup_steps=0"])
        topo = init_topology(cfg)
        trainer = Trainer(cfg, topology=topo, log=lambda _: None, tensorboard=False)
        trainer.train_step()  # warm-up
        rows = []
        for _ in range(STEPS):
            trainer.train_step()
            stage = trainer.engine.pipeline
            busy, wall = torch.tensor(stage.busy_s), torch.tensor(stage.wall_s)
            dist.all_reduce(busy, group=topo.pp_group)
            dist.all_reduce(wall, op=dist.ReduceOp.MAX, group=topo.pp_group)
            rows.append((stage.loops, 1 - busy.item() / topo.pp / wall.item()))
        rec = Recurrence.of(cfg)
        r_max = Recurrence(cfg.model.loops, dataclasses.replace(cfg.recurrence, backprop=0)).window()
        draws = [rec.draw(cfg.train.seed, s) for s in range(2000)]
    if topo.rank == 0:
        circ = statistics.mean((P - 1) / (r * M + P - 1) for r in draws)
        unrolled = 1 - statistics.mean(r / r_max * M / (M + P - 1) for r in draws)
        measured = statistics.mean(f for _, f in rows)
        print(f"(b) P={P}, m={M}, R ~ Poisson-log-normal(mean {cfg.model.loops}), k=4, "
              f"R_max (99th percentile) = {r_max}")
        print(f"    schedule-derived idle share: circular {circ:.3f}, unrolled sized for R_max "
              f"{unrolled:.3f} ({unrolled / circ:.1f}x)")
        print(f"    measured on the ring ({STEPS} steps, R = {[r for r, _ in rows]}): idle share "
              f"{measured:.3f} (per step {', '.join(f'{f:.3f}' for _, f in rows)})")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        activations()
        sys.exit(torchrun_self(__spec__.name, P, 29743))
