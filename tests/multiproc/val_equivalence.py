"""Validation under a layout: the val/ metrics of the same (seeded) model on the same held-out
data, written by rank 0, for the test to compare with one process."""

from __future__ import annotations

import argparse

from parallelism.topology import init_topology
from pretrain.callbacks.validation import Validation
from pretrain.train import Trainer
from tests.conftest import tiny_config
from tests.multiproc.compare import finish

SHAPE = ["model.num_layers=2", "train.micro_batch_size=3", "train.eval_tokens=1600",
         "train.grad_accum_steps=2", "parallel.pipeline_schedule=gpipe"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = tiny_config(*SHAPE, *args.overrides, out_dir=f"{args.out}.run")
    topo = init_topology(cfg)
    trainer = Trainer(cfg, topology=topo, log=None, tensorboard=False)
    finish(topo, Validation(1).evaluate(trainer), args.out)


if __name__ == "__main__":
    main()
