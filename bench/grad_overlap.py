"""Gradient reduction overlapped with backward: exposed reduction time, 2 gloo ranks, DP = 2.

The same ~25M-parameter looped model trains for a few steps twice in one job, reducing the
gradients after backward (`parallel.overlap_grad_reduce=false`) and bucket by bucket during it
(parallelism/grad_overlap.py). Exposed reduction time is what the step waits for after backward
(the reducer's `finish`); its median over the steps after the first (which counts the
contributions and reduces after backward either way) is compared. Goal: overlapped <= 30% of
not overlapped, and the final weights equal bit for bit.

    python -m torch.distributed.run --nproc_per_node=2 -m bench.grad_overlap
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.activation_memory import MODEL
from parallelism.topology import init_topology, shutdown
from pretrain.config import load_config
from pretrain.model.flops import count_parameters
from pretrain.train import Trainer

ROOT = Path(__file__).resolve().parents[1]

STEPS = 9


def trainer(topo, overlap: bool, out: str, bucket: float) -> Trainer:
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *MODEL, "model.loops=2", "parallel.data=2", f"train.max_steps={STEPS}",
        "train.log_every=1000", "optim.warmup_steps=0", "train.grad_accum_steps=2",
        f"parallel.overlap_grad_reduce={str(overlap).lower()}", f"train.out_dir={out}",
        f"parallel.grad_bucket_mb={bucket}"])
    return Trainer(cfg, topology=topo, log=None, tensorboard=False)


def main() -> None:
    torch.set_num_threads(1)
    bucket = float(sys.argv[1]) if len(sys.argv) > 1 else 25.0
    out = tempfile.mkdtemp()
    topo = init_topology(load_config(ROOT / "configs/tiny.yaml", [*MODEL, "parallel.data=2"]))
    runs = {"after backward": trainer(topo, False, out, bucket),
            "overlapped": trainer(topo, True, out, bucket)}
    exposed: dict[str, list[float]] = {name: [] for name in runs}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(STEPS):  # alternate, so machine noise hits both alike
        for name, t in runs.items():
            start = time.perf_counter()
            t.train_step()
            wall[name].append(time.perf_counter() - start)
            exposed[name].append(t.engine.update.reducer.exposed_s)
    off, on = (statistics.median(exposed[n][1:]) for n in runs)  # step 1 counts, both reduce late
    off_step, on_step = (statistics.median(wall[n][1:]) for n in runs)
    models = [t.model.state_dict() for t in runs.values()]
    same = all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    t = runs["overlapped"]
    if topo.rank == 0:
        grad_bytes = sum(p.numel() * 4 for p in t.model.parameters() if p.requires_grad)
        print(f"model {count_parameters(t.cfg.model)['total'] / 1e6:.1f}M parameters, "
              f"{grad_bytes / 2**20:.0f} MiB of fp32 gradients, "
              f"{len(t.engine.update.reducer.buckets)} buckets of {bucket:g} MB, DP=2 on gloo, "
              f"R={t.cfg.model.loops}, {t.cfg.train.grad_accum_steps} micro-batches per step")
        print(f"exposed reduction per step (median of steps 2..{STEPS}): after backward "
              f"{off * 1e3:.1f} ms, overlapped {on * 1e3:.1f} ms -> {on / off:.2f} of not "
              f"overlapped (goal <= 0.30)")
        print(f"step time: after backward {off_step:.2f} s, overlapped {on_step:.2f} s")
        print(f"final weights bit-identical: {same}")
    shutdown(topo)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
