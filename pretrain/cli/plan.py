"""`pretrain plan`: the throughput model's ranking of layouts, printed as a table."""

from __future__ import annotations

import argparse

from pretrain.config import ConfigError, load_config


def _plan(args: argparse.Namespace) -> int:
    from pretrain.hardware import GPUS
    from pretrain.planner import plan

    cfg = load_config(args.config, args.overrides)
    if args.gpu not in GPUS:
        raise ConfigError(f"--gpu: {args.gpu!r} unknown; one of {sorted(GPUS)}")
    batch = args.global_batch or cfg.train.micro_batch_size * cfg.train.grad_accum_steps * args.gpus
    ests = plan(cfg, args.gpus, GPUS[args.gpu], batch)
    ok = [e for e in ests if e.feasible]
    print(f"{len(ok)} of {len(ests)} layouts fit ({args.gpus} x {GPUS[args.gpu].name}, global "
          f"batch {batch} x {cfg.train.seq_len} tokens, R={cfg.model.loops})")
    print(f"{'TP':>3} {'PP':>3} {'DP':>4} {'mb':>3} {'m':>4} | {'mem GiB':>8} | {'bubble':>6} | "
          f"{'TP comm':>8} | {'DP comm':>8} | {'step s':>7} | {'MFU':>6} | tokens/s")
    for e in ok[:args.top]:
        lay, t = e.layout, e.time_s
        print(f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch:>3} {lay.microbatches:>4} | "
              f"{e.memory_gb['total']:8.1f} | {100 * t['bubble'] / e.step_s:5.1f}% | "
              f"{1e3 * t['tp_comm']:6.0f}ms | {1e3 * t['dp_comm_exposed']:6.0f}ms | "
              f"{e.step_s:7.3f} | {100 * e.mfu:5.1f}% | {e.tokens_per_s:,.0f}")
    for e in [e for e in ests if not e.feasible][:3]:
        lay = e.layout
        print(f"rejected TP {lay.tp} PP {lay.pp} DP {lay.dp} mb {lay.micro_batch}: {e.why}")
    if not ok:
        raise ConfigError(f"plan: no layout of {args.gpus} GPUs fits (reasons above)")
    return 0


def add_commands(sub) -> None:
    pl = sub.add_parser("plan", help="predict memory, bubble, comm and MFU; rank the layouts")
    pl.add_argument("--config", required=True)
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, required=True)
    pl.add_argument("--gpu", default="h100", help="h100, h200, a100, b200")
    pl.add_argument("--global-batch", type=int, default=0, help="sequences per step")
    pl.add_argument("--top", type=int, default=10)
    pl.set_defaults(fn=_plan)
