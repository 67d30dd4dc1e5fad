"""Run under torchrun: the circular pipeline (PP = 2, optionally x TP = 2) against the
single-process model on the same microbatches. Every rank builds the single-process model from
the seed as its reference; rank 0 writes the worst relative errors per case to --out. Cases
with a backprop window (k < R: the first R - k laps without a graph) and huginn's random
initial states (seeded per microbatch) take the single process's forward at the same R, k and
seeds as the reference."""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
import torch.distributed as dist

from core.model_interface import LoopPlan
from parallelism.pipeline import PipelineStage, global_name, keep_stage, sum_tied_grads
from parallelism.pipeline_schedule import peak_live, schedule, warmup_count
from parallelism.tensor_parallel import gather_full, parallelize_tensor, vocab_parallel_token_ce
from parallelism.topology import Topology, init_topology
from pretrain.config import ConfigError
from pretrain.model.looped import LoopedLM
from pretrain.model.memory import MemoryPolicy
from pretrain.model.objective import compute_objective, readout_steps, token_cross_entropy
from pretrain.train import Trainer
from tests.conftest import PARALLEL_VARIANTS, tiny_config
from tests.conftest import VARIANTS as ALL_VARIANTS
from tests.multiproc.compare import close_to, finish, rel

SHAPES = ["model.vocab_size=260", "model.num_kv_heads=4", "model.num_layers=3", "train.seq_len=16"]
VARIANTS = {**PARALLEL_VARIANTS, "ouro_no_norm": ALL_VARIANTS["ouro_no_norm"],
            # what backward keeps (pretrain/model/memory.py) inside every piece of the ring
            "ouro_mem": ["train.recompute=loops", "train.recompute_keep_last_loops=1",
                         "train.loss_chunk_tokens=6"],
            "flt_mem": [*PARALLEL_VARIANTS["flt_recipe"], "train.recompute=full",
                        "train.loss_chunk_tokens=5"]}
# the backprop-window cases (loops, k): huginn as released, its head tied to the embedding
# (both ends of the ring hold the weight)
WINDOW_VARIANTS = {"ouro": VARIANTS["ouro"], "flt_recipe": VARIANTS["flt_recipe"],
                   "huginn": [*ALL_VARIANTS["huginn"],
                              "model.state_std=0.08"]}
WINDOWS = ((3, 1), (4, 2))


def one_case(topo, loops, m, kind, variant, split, sp, backprop=0) -> dict:
    try:
        cfg = tiny_config(*SHAPES, f"model.loops={loops}",
                          *(WINDOW_VARIANTS if backprop else VARIANTS)[variant],
                          f"parallel.pipeline={topo.pp}", f"parallel.tensor={topo.tp}",
                          f"parallel.sequence_parallel={str(sp).lower()}",
                          f"parallel.pipeline_schedule={kind}", f"train.grad_accum_steps={m}",
                          f"parallel.pipeline_split=[{','.join(map(str, split))}]")
    except ConfigError as e:
        return {"config_error": str(e)}
    torch.manual_seed(cfg.train.seed)
    ref = LoopedLM(cfg.model)
    g = torch.Generator().manual_seed(7)
    batches = []
    for _ in range(m):
        ids = torch.randint(0, 257, (2, 16), generator=g)
        labels = torch.randint(0, 257, (2, 16), generator=g)
        labels[0, :2] = -100
        batches.append((ids, labels))
    stage = copy.deepcopy(ref)
    ce = None
    if topo.tp > 1:
        parallelize_tensor(stage, topo, sp)
        ce = vocab_parallel_token_ce
    stage.set_memory(MemoryPolicy.of(cfg.train, topo.tp if sp else 1))
    keep_stage(stage, split, topo.pp_rank)
    pipe = PipelineStage(stage, topo, cfg, lambda r: readout_steps(cfg.objective.kind, r))
    plan = LoopPlan(loops, backprop or loops, tuple(range(100, 100 + m)))
    out = pipe.run(batches, kind,
                   lambda o, lb: compute_objective(cfg.objective, o, lb, ce or token_cross_entropy), plan)
    sum_tied_grads(stage, topo)
    reads = readout_steps(cfg.objective.kind, loops)
    total = sum(compute_objective(cfg.objective, ref(ids, read_steps=reads, backprop=plan.backprop,
                                                     state_seed=seed), labels).loss
                for (ids, labels), seed in zip(batches, plan.state_seeds, strict=True)) / m
    total.backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    worst, worst_name, close = 0.0, "", True
    for name, p in stage.named_parameters():
        if p.grad is None:  # the gate under an objective that does not train it
            close &= ref_grads[global_name(stage, name)] is None
            continue
        got = gather_full(p.grad, getattr(p, "tp_split", None), topo)
        want = ref_grads[global_name(stage, name)]
        close &= close_to(got, want)
        e = rel(got, want)
        if e > worst:
            worst, worst_name = e, global_name(stage, name)
    res = {"grad": worst, "grad_param": worst_name, "grad_close": close, "peak_live": pipe.peak_live,
           "sent_bytes": pipe.sent_bytes,
           "bound": warmup_count(topo.pp, plan.backprop, m, topo.pp_rank) + 1,
           "planned_peak": peak_live(schedule(kind, topo.pp, plan.backprop, m, topo.pp_rank))}
    if out is not None:
        res["loss"] = rel(out.loss, total.detach())
    return res


def training_case(topo, loops: int) -> dict:
    base = [*SHAPES, f"model.loops={loops}", "train.max_steps=10", "train.log_every=1",
            "optim.warmup_steps=0", "train.grad_accum_steps=2", "train.micro_batch_size=4",
            f"train.out_dir={tempfile.mkdtemp(prefix='pp-train-')}"]
    par = Trainer(tiny_config(*base, f"parallel.pipeline={topo.pp}", f"parallel.tensor={topo.tp}"),
                  topology=topo, log=lambda _: None, tensorboard=False).fit(save=False)
    ref = Trainer(tiny_config(*base), topology=Topology(), log=lambda _: None,
                  tensorboard=False).fit(save=False)
    return {"losses_par": [s["train/loss"] for s in par.history],
            "losses_ref": [s["train/loss"] for s in ref.history]}


def cases(tp: int) -> list[tuple]:
    """The grid: Ouro over R, m, schedule and split; every other loop mode at R = 3 (R = 2
    with TP), where each lap's payload and stage 0's kept embedding stream are exercised."""
    small = tp > 1
    grid = [(r, m, kind, "ouro", split) for r in ((1, 2) if small else (1, 2, 4))
            for m in ((2, 4) if small else (1, 2, 4, 8)) for kind in ("1f1b", "gpipe")
            for split in ([[2, 1]] if small else [[2, 1], [1, 2]])]
    for variant in VARIANTS:
        if variant != "ouro":
            grid += [(2 if small else 3, m, kind, variant, split) for m in ((2,) if small else (2, 4))
                     for kind in ("1f1b", "gpipe")
                     for split in ([[2, 1]] if small else [[2, 1], [1, 2]])]
    return grid


def window_cases(tp: int) -> list[tuple]:
    """(loops, k, m, kind, variant, split): truncated backprop in the ring, every window
    variant, both schedules."""
    return [(r, k, 2, kind, v, [2, 1]) for r, k in WINDOWS[(1 if tp > 1 else 0):]
            for kind in ("1f1b", "gpipe") for v in WINDOW_VARIANTS]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    args = ap.parse_args()
    world = int(os.environ["WORLD_SIZE"])
    pp = world // args.tp
    topo = init_topology(tiny_config(*SHAPES, f"parallel.pipeline={pp}", f"parallel.tensor={args.tp}",
                                     "train.grad_accum_steps=2"))
    results = {}
    for loops, m, kind, variant, split in cases(args.tp):
        key = f"R{loops}-m{m}-{kind}-{variant}-{split[0]}{split[1]}"
        results[key] = one_case(topo, loops, m, kind, variant, split, sp=args.tp > 1)
    for loops, k, m, kind, variant, split in window_cases(args.tp):
        key = f"R{loops}k{k}-m{m}-{kind}-{variant}-{split[0]}{split[1]}"
        results[key] = one_case(topo, loops, m, kind, variant, split, args.tp > 1, backprop=k)
    for loops in (1, 3):
        results[f"train-R{loops}"] = training_case(topo, loops)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    finish(topo, gathered, args.out)


if __name__ == "__main__":
    main()
