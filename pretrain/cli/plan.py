"""`pretrain plan`: the throughput model's ranking of layouts, printed as a table."""

from __future__ import annotations

import argparse

from core.config_schema import ConfigError
from pretrain.cli.flags import at_least


def _plan(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.kernels import train_options
    from pretrain.planning.hardware import GPUS
    from pretrain.planning.planner import plan, realising_config

    cfg = load_config(args.config, args.overrides)
    gpu = _gpu(args.gpu, GPUS)
    batch = args.global_batch or cfg.train.micro_batch_size * cfg.train.grad_accum_steps * args.gpus
    ests = plan(cfg, args.gpus, gpu, batch)
    ok = [e for e in ests if e.feasible]
    print(f"{len(ok)} of {len(ests)} layouts fit ({args.gpus} x {gpu.name}, global "
          f"batch {batch} x {cfg.train.seq_len} tokens, R={cfg.model.loops}; "
          f"{train_options(cfg.train)}, grad-reduce overlap "
          f"{'on' if cfg.parallel.overlap_grad_reduce else 'off'})")
    print(f"{'TP':>3} {'PP':>3} {'DP':>4} {'mb':>3} {'m':>4} | {'mem GiB':>8} | {'bubble':>6} | "
          f"{'TP comm':>8} | {'DP comm':>8} | {'step s':>7} | {'MFU':>6} | tokens/s")
    for e in ok[:args.top]:
        lay, t = e.layout, e.time_s
        print(f"{lay.tp:>3} {lay.pp:>3} {lay.dp:>4} {lay.micro_batch:>3} {lay.microbatches:>4} | "
              f"{e.memory_gb['total']:8.1f} | {100 * t['bubble'] / e.step_s:5.1f}% | "
              f"{1e3 * t['tp_comm']:6.0f}ms | {1e3 * t['dp_comm_exposed']:6.0f}ms | "
              f"{e.step_s:7.3f} | {100 * e.mfu:5.1f}% | {e.tokens_per_s:,.0f}")
    if ok:
        print(f"the first row, as run: pretrain train --config {args.config} "
              + " ".join(realising_config(cfg, ok[0].layout)))
    for e in [e for e in ests if not e.feasible][:3]:
        lay = e.layout
        print(f"rejected TP {lay.tp} PP {lay.pp} DP {lay.dp} mb {lay.micro_batch}: {e.why}")
    if not ok:
        raise ConfigError(f"plan: no layout of {args.gpus} GPUs fits (reasons above)")
    return 0


def _rehearse(args: argparse.Namespace) -> int:
    """Every TP x PP x DP x ZeRO layout of --gpus, set up on meta (pretrain/planning/rehearse.py)."""
    from pretrain.planning.rehearse import layouts, reference_shapes, rehearse

    reference = reference_shapes(args.config, args.overrides)
    results = [rehearse(args.config, args.overrides, *lay, reference) for lay in layouts(args.gpus)]
    for r in results:
        print(f"{r.name:<32} {'ok' if not r.error else 'cannot run: ' + r.error}")
    ok = sum(not r.error for r in results)
    print(f"rehearsed {len(results)} layouts of {args.gpus} GPUs on the meta device: {ok} set up")
    if not ok:
        raise ConfigError(f"plan --rehearse: no layout of {args.gpus} GPUs can be set up")
    return 0


def _fake(args: argparse.Namespace) -> int:
    """The config's own layout, one rank per stage under fake tensors, beside the planner."""
    from pretrain.config import load_config
    from pretrain.planning.hardware import GPUS
    from pretrain.planning.plan_check import check_layout, report

    cfg = load_config(args.config, args.overrides)
    print("\n".join(report(check_layout(cfg, _gpu(args.gpu, GPUS)))))
    return 0


def _gpu(name: str, table: dict):
    if name not in table:
        raise ConfigError(f"--gpu: {name!r} unknown; one of {sorted(table)}")
    return table[name]


def _choose(args: argparse.Namespace) -> int:
    if args.fake:
        return _fake(args)
    if args.gpus is None:
        raise ConfigError("plan: --gpus is required (except with --fake: the config's layout)")
    return _rehearse(args) if args.rehearse else _plan(args)


def add_commands(sub) -> None:
    pl = sub.add_parser("plan", help="predict memory, bubble, comm and MFU; rank the layouts")
    pl.add_argument("--config", required=True, help="YAML config file")
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=at_least(1), help="GPUs to lay the run out on")
    pl.add_argument("--gpu", default="h100", help="a key of pretrain/planning/hardware.py's table")
    pl.add_argument("--global-batch", type=at_least(0), default=0, help="sequences per step")
    pl.add_argument("--top", type=at_least(1), default=10, help="layouts to print")
    pl.add_argument("--rehearse", action="store_true",
                    help="set every layout up on the meta device (TP layers, pipeline stages, "
                         "ZeRO config, checkpoint entries) instead of ranking them")
    pl.add_argument("--fake", action="store_true",
                    help="run the config's own layout's training step, one rank per pipeline "
                         "stage, at full shapes under fake tensors; print peak memory, FLOPs, "
                         "ops and collective bytes beside the planner's (minutes on a CPU)")
    pl.set_defaults(fn=_choose)
