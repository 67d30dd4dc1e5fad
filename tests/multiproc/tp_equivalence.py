"""Run under torchrun with N processes: tensor parallelism (TP=N) against the single-process
model on the same inputs. Every rank builds the TP=1 model from the seed in-process as the
reference; rank 0 writes the worst relative errors per case as JSON to --out."""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch

from parallelism.tensor_parallel import (
    full_state_dict,
    gather_full,
    parallelize_tensor,
    vocab_parallel_token_ce,
)
from parallelism.topology import Topology, init_topology
from pretrain.model.looped import LoopedLM
from pretrain.model.memory import DeferredLogits, MemoryPolicy
from pretrain.model.objective import compute_objective, readout_steps
from pretrain.train import Trainer
from tests.conftest import PARALLEL_VARIANTS, tiny_config
from tests.conftest import VARIANTS as ALL_VARIANTS
from tests.multiproc.compare import close_to, finish, rel

TP_SHAPES = ["model.vocab_size=260", "model.num_kv_heads=4", "train.seq_len=16"]
# huginn from a seeded random state: its adapter and qk_bias under TP, x_0 cut for SP
VARIANTS = {**PARALLEL_VARIANTS, "huginn": [*ALL_VARIANTS["huginn"], "model.state_std=0.08"]}
WINDOW = 2  # the `-k2` cases backpropagate through the last 2 of R = 3 loop steps


# what backward keeps (pretrain/model/memory.py) under TP (+SP): recompute in every layer and
# the vocab-parallel CE over uneven chunks of each rank's sequence shard
MEMORY = ["train.recompute=full", "train.loss_chunk_tokens=6"]


def one_case(topo, loops: int, variant: str, sp: bool, memory: list[str] = (),
             backprop: int = 0) -> dict:
    cfg = tiny_config(*TP_SHAPES, f"model.loops={loops}", *VARIANTS[variant], *memory,
                      f"parallel.tensor={topo.tp}", f"parallel.sequence_parallel={str(sp).lower()}")
    torch.manual_seed(cfg.train.seed)
    ref = LoopedLM(cfg.model)
    par = copy.deepcopy(ref)
    parallelize_tensor(par, topo, sp)
    par.set_memory(MemoryPolicy.of(cfg.train, topo.tp if sp else 1))
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 257, (2, 16), generator=g)
    labels = torch.randint(0, 257, (2, 16), generator=g)
    labels[0, :3] = -100
    read_steps = readout_steps(cfg.objective.kind, loops)
    out_ref = ref(ids, read_steps=read_steps, backprop=backprop, state_seed=5)
    out_par = par(ids, read_steps=read_steps, backprop=backprop, state_seed=5)
    errs = {"logits": 0.0, "gate": rel(out_par.gate_logits.nan_to_num(),
                                       out_ref.gate_logits.nan_to_num()),
            "stream_rows": par.embed(ids.t()).shape[0]}  # 16 / tp under sequence parallelism
    head_split = par.embed.weight.tp_split
    for lr, lp in zip(out_ref.logits, out_par.logits, strict=True):
        if lr is None:
            assert lp is None
            continue
        lp = lp.materialize() if isinstance(lp, DeferredLogits) else lp
        full = gather_full(lp.detach().transpose(0, 2), head_split, topo).transpose(0, 2)
        errs["logits"] = max(errs["logits"], rel(full, lr.detach()))
    loss_ref = compute_objective(cfg.objective, out_ref, labels).loss
    loss_par = compute_objective(cfg.objective, out_par, labels, vocab_parallel_token_ce).loss
    errs["loss"] = rel(loss_par.detach(), loss_ref.detach())
    loss_ref.backward()
    loss_par.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    worst, worst_name, close = 0.0, "", True
    for name, p in par.named_parameters():
        if p.grad is None:  # the gate under an objective that does not train it
            close &= ref_grads[name] is None
            continue
        full = gather_full(p.grad, getattr(p, "tp_split", None), topo)
        close &= close_to(full, ref_grads[name])
        e = rel(full, ref_grads[name])
        if e > worst:
            worst, worst_name = e, name
    errs["grad"], errs["grad_param"], errs["grad_close"] = worst, worst_name, close
    state = full_state_dict(par, topo)
    errs["state_exact"] = all(torch.equal(state[k], v) for k, v in ref.state_dict().items())
    return errs


def training_case(topo, sp: bool, extra: list[str] = ()) -> dict:
    """5 optimizer steps through the real Trainer at TP=N vs TP=1 (same process, same data)."""
    base = [*TP_SHAPES, "train.max_steps=5", "train.log_every=1", "optim.warmup_steps=0",
            f"train.out_dir={tempfile.mkdtemp(prefix='tp-train-')}", *extra]
    cfg_par = tiny_config(*base, f"parallel.tensor={topo.tp}",
                          f"parallel.sequence_parallel={str(sp).lower()}")
    cfg_ref = tiny_config(*base)
    par = Trainer(cfg_par, topology=topo, log=lambda _: None, tensorboard=False).fit(save=False)
    ref = Trainer(cfg_ref, topology=Topology(), log=lambda _: None,
                  tensorboard=False).fit(save=False)
    return {"losses_par": [s["train/loss"] for s in par.history],
            "losses_ref": [s["train/loss"] for s in ref.history],
            "gnorm_par": [s["train/grad_norm"] for s in par.history],
            "gnorm_ref": [s["train/grad_norm"] for s in ref.history]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    topo = init_topology(tiny_config(*TP_SHAPES, f"parallel.tensor={world}"))
    results = {}
    for loops in (1, 3):
        for variant in VARIANTS:
            for sp in (False, True):
                results[f"R{loops}-{variant}-sp{int(sp)}"] = one_case(topo, loops, variant, sp)
    for variant in ("ouro", "flt_recipe"):
        for sp in (False, True):
            results[f"R3-{variant}-sp{int(sp)}-memory"] = one_case(topo, 3, variant, sp, MEMORY)
    for variant in ("ouro", "flt_recipe", "huginn"):
        for sp in (False, True):
            results[f"R3-{variant}-sp{int(sp)}-k{WINDOW}"] = one_case(topo, 3, variant, sp,
                                                                     backprop=WINDOW)
    for sp in (False, True):
        results[f"train-sp{int(sp)}"] = training_case(topo, sp)
        # Huginn's recipe: R drawn per step (mean 3), gradients through the last 2
        results[f"train-sp{int(sp)}-sampled"] = training_case(topo, sp, [
            *VARIANTS["huginn"], "recurrence.sampler=poisson_lognormal",
            "recurrence.backprop=2"])
    finish(topo, results, args.out)


if __name__ == "__main__":
    main()
