"""Run under torchrun: DeepSpeed ZeRO-1/2 over the DP group (with TP or the pipeline when the
world allows) against the single-process trainer with unsharded AdamW; rank 0 writes JSON."""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist

from parallelism.pipeline import gather_stages
from parallelism.tensor_parallel import full_state_dict
from parallelism.topology import Topology, init_topology
from parallelism.zero import optimizer_state_bytes
from pretrain.train import Trainer
from tests.conftest import tiny_config
from tests.multiproc.compare import adamw_reach, finish, weights_match

# lr 3e-4: five steps move the weights by ~1e-3, so a wrong update shows; the weights are
# compared as compare.py `weights_match` says (an element whose gradient sits at rounding level
# of zero may move the other way under reduce-scatter)
BASE = ["model.vocab_size=260", "model.num_kv_heads=4", "train.seq_len=16",
        "train.max_steps=5", "train.log_every=1", "optim.warmup_steps=0", "optim.lr=3e-4",
        "optim.min_lr=3e-5",
        "train.micro_batch_size=4", "train.grad_accum_steps=2"]


def run(topo, layout: list[str], stage: int) -> dict:
    out = tempfile.mkdtemp(prefix="zero-")
    dp = topo.dp
    par_cfg = tiny_config(*BASE, *layout, f"parallel.zero_stage={stage}",
                          f"train.micro_batch_size={4 // dp}", f"train.out_dir={out}")
    par = Trainer(par_cfg, topology=topo, log=lambda _: None, tensorboard=False)
    hist = par.fit(save=False).history
    ref = Trainer(tiny_config(*BASE, f"train.out_dir={out}-ref"), topology=Topology(),
                  log=lambda _: None, tensorboard=False)
    ref.initial = {k: v.clone() for k, v in ref.model.state_dict().items()}
    ref_hist = ref.fit(save=False).history
    state = full_state_dict(par.model, topo) if topo.tp > 1 else par.model.state_dict()
    if par.engine.pipeline is not None:
        state = gather_stages(par.model, state, topo)
    want = ref.model.state_dict()
    o = par_cfg.optim
    reach = adamw_reach(o.lr, o.beta1, o.beta2, par_cfg.train.max_steps)
    param_err = [f"{k}: {why}" for k, v in want.items()
                 if (why := weights_match(state[k], v, reach)) is not None]
    moved = max((v - ref.initial[k]).abs().max().item() for k, v in want.items())
    local = sum(p.numel() for p in par.model.parameters())
    return {"losses": [s["train/loss"] for s in hist], "ref_losses": [s["train/loss"] for s in ref_hist],
            "param_mismatch": param_err, "param_moved": moved,
            "state_bytes": optimizer_state_bytes(par.engine.zero),
            "unsharded_bytes": 2 * 4 * local, "dp": dp,
            "gnorm": [s["train/grad_norm"] for s in hist],
            "ref_gnorm": [s["train/grad_norm"] for s in ref_hist]}


def nan_case(topo, stage: int) -> dict:
    """Step 2 sees a NaN loss on DP rank 1 only."""
    cfg = tiny_config(*BASE, f"parallel.data={topo.dp}", f"parallel.zero_stage={stage}",
                      f"train.micro_batch_size={4 // topo.dp}",
                      f"train.out_dir={tempfile.mkdtemp(prefix='nan-')}")
    trainer = Trainer(cfg, topology=topo, log=lambda _: None, tensorboard=False)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real = trainer.model.forward

    def poisoned(ids, **kw):
        out = real(ids, **kw)
        if topo.dp_rank == 1:
            out.logits[-1] = out.logits[-1] * float("nan")
        return out

    trainer.model.forward = poisoned
    ok = trainer.train_step().ok
    unchanged = all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(),
                                                       strict=True))
    trainer.model.forward = real
    next_ok = trainer.train_step().ok
    moved = not all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(),
                                                       strict=True))
    return {"skipped_ok": ok, "skipped": trainer.skipped, "unchanged": unchanged,
            "next_ok": next_ok, "moved": moved}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layout", default="dp", choices=["dp", "tp", "pp", "nan"])
    ap.add_argument("--stage", type=int, default=1)
    args = ap.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    if args.layout == "nan":
        topo = init_topology(tiny_config(*BASE, f"parallel.data={world}"))
        results = [None] * world
        dist.all_gather_object(results, nan_case(topo, args.stage))
        finish(topo, results, args.out)
        return
    layout = {"dp": [f"parallel.data={world}"],
              "tp": ["parallel.tensor=2", f"parallel.data={world // 2}",
                     "parallel.sequence_parallel=true"],
              "pp": ["parallel.pipeline=2", f"parallel.data={world // 2}"]}[args.layout]
    topo = init_topology(tiny_config(*BASE, *layout))
    stages = (1,) if args.layout == "pp" else (1, 2)
    results = {f"zero{s}": run(topo, layout, s) for s in stages}
    finish(topo, results, args.out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
