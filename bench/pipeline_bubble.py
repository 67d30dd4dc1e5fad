"""Pipeline bubble of the circular schedule vs a non-circular unrolled baseline, measured.

Run: `python -m bench.pipeline_bubble` (re-launches itself under torchrun: P = 2 gloo
processes, one thread each). Each rank times its busy time (running its pieces, including
sending) per step; bubble = 1 - mean busy / step time (the idle share of device time), median
over steps; step times compare the same work in both layouts.
  circular: the looped model (N shared layers, R loops), stage k owns N/P layers, interleaved
            1F1B over the R laps; theory (p - 1) / (R m + p - 1).
  baseline: the same work unrolled -- R*N independent layers, one loop -- split into P stages
            and run with GPipe (what a framework without weight sharing across stages does);
            theory (p - 1) / (m + p - 1).
The formula assumes equal stages; the last stage also runs R readouts (LM head, gate, loss),
so the imbalance-aware theory charges the pace of the busiest stage: 1 - (1 - t) / imbalance.
Goal: measured <= 1.15 x theory, and the circular bubble >= 2x smaller than the baseline's at R=4.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from bench.torchrun_self import torchrun_self

ROOT = Path(__file__).resolve().parents[1]

LAYERS, P = 4, 2
SHAPE = ["model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=4",
         "model.ffn_hidden_size=704", "model.vocab_size=260", "model.max_seq_len=128",
         "train.seq_len=128", "train.micro_batch_size=4", "optim.warmup_steps=0"]


def bubble(cfg, topo, steps: int) -> tuple[float, float, float]:
    """(idle share of device time, 1 - mean busy / step time; busiest rank's busy time over the
    mean (stage imbalance); step time in s), medians over `steps` steps after a warm-up. The
    ranks start each step together (the previous step ends in collectives), and the step lasts
    until its slowest rank finishes."""
    from pretrain.train import Trainer

    trainer = Trainer(cfg, topology=topo, log=lambda _: None, tensorboard=False)
    trainer.train_step()  # warm-up
    fractions, imbalance, walls = [], [], []
    for _ in range(steps):
        trainer.train_step()
        stage = trainer.engine.pipeline
        busy = torch.tensor(stage.busy_s)
        top = busy.clone()
        wall = torch.tensor(stage.wall_s)
        dist.all_reduce(busy, group=topo.pp_group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=topo.pp_group)
        dist.all_reduce(wall, op=dist.ReduceOp.MAX, group=topo.pp_group)
        mean = busy.item() / topo.pp
        fractions.append(1 - mean / wall.item())
        imbalance.append(top.item() / mean)
        walls.append(wall.item())
    return tuple(statistics.median(x) for x in (fractions, imbalance, walls))


def worker() -> None:
    from parallelism.topology import init_topology
    from pretrain.config import load_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = [*SHAPE, f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={tmp}",
                f"parallel.pipeline={P}"]
        topo = None
        for loops in (1, 2, 4):
            for m in (2, 4, 8):
                circ = load_config(ROOT / "configs/tiny.yaml", [
                    *base, f"model.num_layers={LAYERS}", f"model.loops={loops}",
                    f"train.grad_accum_steps={m}", "parallel.pipeline_schedule=1f1b"])
                unrolled = load_config(ROOT / "configs/tiny.yaml", [
                    *base, f"model.num_layers={LAYERS * loops}", "model.loops=1",
                    f"train.grad_accum_steps={m}", "parallel.pipeline_schedule=gpipe",
                    f"parallel.pipeline_split=[{LAYERS * loops // 2},{LAYERS * loops // 2}]"])
                topo = topo or init_topology(circ)
                rows.append((loops, m, bubble(circ, topo, 4), bubble(unrolled, topo, 4)))
    if topo.rank == 0:
        print(f"P={P}, {LAYERS} shared layers, hidden 256, 4 x 128 tokens per microbatch")
        print(" R  m | circular 1F1B: bubble theory ratio | imbalance-aware theory ratio |"
              " unrolled GPipe: bubble theory | bubble base/circ | step time base/circ")
        for loops, m, (circ, imb, wall_c), (base, _, wall_b) in rows:
            t_c, t_b = (P - 1) / (loops * m + P - 1), (P - 1) / (m + P - 1)
            # the busiest stage sets the pace: step = its busy time / (1 - t_c)
            t_imb = 1 - (1 - t_c) / imb
            print(f"{loops:>2} {m:>2} |           {circ:6.3f} {t_c:6.3f} {circ / t_c:5.2f} |"
                  f"               {t_imb:6.3f} {circ / t_imb:5.2f} |"
                  f"                {base:6.3f} {t_b:6.3f} | {base / circ:15.2f}x |"
                  f" {wall_b / wall_c:18.2f}x")

if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        sys.exit(torchrun_self(__spec__.name, P, 29741))
