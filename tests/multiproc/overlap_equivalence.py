"""Run under torchrun (2 or 4 processes): DP = 2 training with the gradient reduction overlapped
with backward (parallelism/grad_overlap.py) against the same run reducing after backward, both
in this job. With 4 processes the data-parallel pair is of circular-pipeline stages (PP = 2),
whose shared block gets a contribution per lap. Rank 0 writes, per case, whether every weight
and loss is bit-identical and how many buckets were launched during backward."""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from parallelism.topology import init_topology
from pretrain.train import Trainer
from tests.conftest import tiny_config
from tests.multiproc.compare import finish


def config(overlap: bool, pp: int, *extra: str):
    return tiny_config("train.max_steps=4", "train.log_every=1", "optim.warmup_steps=0",
                       "parallel.data=2", f"parallel.pipeline={pp}", "train.grad_accum_steps=2",
                       "train.micro_batch_size=4", "parallel.grad_bucket_mb=0.01",
                       f"parallel.overlap_grad_reduce={str(overlap).lower()}",
                       f"train.out_dir={tempfile.mkdtemp(prefix='overlap-')}", *extra)


def run(topo, cfg):
    trainer = Trainer(cfg, topology=topo, log=lambda _: None, tensorboard=False)
    reducer = trainer.engine.update.reducer
    launched = []
    original = reducer.finish

    def counting():  # buckets already on the wire when backward ends
        launched.append(sum(b.work is not None for b in reducer.buckets))
        original()

    reducer.finish = counting
    summary = trainer.fit(save=False)
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return [s["train/loss"] for s in summary.history], state, len(reducer.buckets), launched


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pp = int(os.environ["WORLD_SIZE"]) // 2
    topo = init_topology(config(True, pp))
    results = {}
    for name, extra in {"plain": [], "loops-recompute": ["train.recompute=loops"]}.items():
        loss_on, on, buckets, launched = run(topo, config(True, pp, *extra))
        loss_off, off, _, _ = run(topo, config(False, pp, *extra))
        results[name] = {"losses_equal": loss_on == loss_off,
                         "weights_equal": all(torch.equal(on[k], off[k]) for k in off),
                         "buckets": buckets, "during_backward": launched}
    finish(topo, results, args.out)


if __name__ == "__main__":
    main()
