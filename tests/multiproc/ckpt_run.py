"""Run under torchrun (or alone): train the tiny model in some layout, optionally resuming a
checkpoint first, and report (rank 0, JSON at --out) the per-step losses and the full
single-process weights right after the resume (gathered from every TP shard and PP stage)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from parallelism.pipeline import gather_stages
from parallelism.tensor_parallel import full_state_dict
from parallelism.topology import shutdown
from pretrain.train import Trainer
from tests.conftest import tiny_config


def full_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in full_state_dict(trainer.model, trainer.topo).items()
             if torch.is_tensor(v)}  # a copy: training moves the weights on
    if trainer.topo.pp > 1:
        state = gather_stages(trainer.model, state, trainer.topo)
    return state


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--resume", default="none")
    ap.add_argument("--crash-rank0-at-save", type=int, default=0,
                    help="rank 0 dies before writing its shards of this step's checkpoint")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    trainer = Trainer(tiny_config(*args.overrides), tensorboard=False)
    if args.crash_rank0_at_save and trainer.topo.rank == 0:
        import os

        import torch.distributed.checkpoint as dcp

        real = dcp.FileSystemWriter.write_data

        def write_data(self, plan, planner):
            if f"step_{args.crash_rank0_at_save:07d}" in str(self.path):
                deadline = time.time() + 30  # rank 1 writes its half; rank 0 dies before its own
                while not list(Path(self.path).glob("__1_*.distcp")) and time.time() < deadline:
                    time.sleep(0.01)
                os._exit(9)
            return real(self, plan, planner)

        dcp.FileSystemWriter.write_data = write_data
    if args.resume != "none":
        trainer.resume(args.resume)
    weights = full_weights(trainer)
    summary = trainer.fit()
    if trainer.topo.rank == 0:
        torch.save(weights, args.out + ".pt")
        with open(args.out, "w") as fh:
            json.dump({"losses": {s["step"]: s["train/loss"] for s in summary.history},
                       "checkpoint": str(summary.checkpoint)}, fh)
    shutdown(trainer.topo)


if __name__ == "__main__":
    sys.exit(main())
