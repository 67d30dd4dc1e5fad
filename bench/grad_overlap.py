"""Gradient reduction overlapped with backward: exposed reduction time, 2 gloo ranks, DP = 2.

The same ~25M-parameter looped model trains for a few steps twice in one job, reducing the
gradients after backward (`parallel.overlap_grad_reduce=false`) and bucket by bucket during it
(parallelism/grad_overlap.py). Exposed reduction time is what the step waits for after backward
(the reducer's `finish`); its median over the steps after the first (which counts the
contributions and reduces after backward either way) is compared. Goal: overlapped <= 30% of
not overlapped, and the final weights equal bit for bit.

    python -m torch.distributed.run --nproc_per_node=2 bench/grad_overlap.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.activation_memory import MODEL  # noqa: E402
from parallelism.topology import init_topology, shutdown  # noqa: E402
from pretrain.config import load_config  # noqa: E402
from pretrain.model.flops import count_parameters  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

STEPS = 6


def run(topo, overlap: bool, out: str, bucket: float):
    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *MODEL, "model.loops=2", "parallel.data=2", f"train.max_steps={STEPS}",
        "train.log_every=1000", "optim.warmup_steps=0", "train.grad_accum_steps=2",
        f"parallel.overlap_grad_reduce={str(overlap).lower()}", f"train.out_dir={out}",
        f"parallel.grad_bucket_mb={bucket}"])
    trainer = Trainer(cfg, topology=topo, log=None, tensorboard=False)
    exposed, wall = [], []
    reducer = trainer.engine.update.reducer
    for _ in range(STEPS):
        t0 = time.perf_counter()
        trainer.train_step()
        wall.append(time.perf_counter() - t0)
        exposed.append(reducer.exposed_s)
    grad_bytes = sum(p.numel() * 4 for p in trainer.model.parameters() if p.requires_grad)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return (cfg, statistics.median(exposed[1:]), statistics.median(wall[1:]), len(reducer.buckets),
            grad_bytes, state)


def main() -> None:
    torch.set_num_threads(1)
    bucket = float(sys.argv[1]) if len(sys.argv) > 1 else 25.0
    out = tempfile.mkdtemp()
    probe = load_config(ROOT / "configs/tiny.yaml", [*MODEL, "parallel.data=2"])
    topo = init_topology(probe)
    cfg, off_s, off_step, _, grad_bytes, off = run(topo, False, out, bucket)
    _, on_s, on_step, buckets, _, on = run(topo, True, out, bucket)
    same = all(torch.equal(on[k], off[k]) for k in off)
    if topo.rank == 0:
        print(f"model {count_parameters(cfg.model)['total'] / 1e6:.1f}M parameters, "
              f"{grad_bytes / 2**20:.0f} MiB of fp32 gradients, {buckets} buckets of "
              f"{cfg.parallel.grad_bucket_mb:g} MB, DP=2 on gloo, R={cfg.model.loops}, "
              f"{cfg.train.grad_accum_steps} micro-batches per step")
        print(f"exposed reduction per step (median of steps 2..{STEPS}): after backward "
              f"{off_s * 1e3:.1f} ms, overlapped {on_s * 1e3:.1f} ms -> {on_s / off_s:.2f} "
              f"of not overlapped (goal <= 0.30)")
        print(f"step time: after backward {off_step:.2f} s, overlapped {on_step:.2f} s")
        print(f"final weights bit-identical: {same}")
    shutdown(topo)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
