"""`pretrain` commands around runs: SLURM submission and status, sweeps, the throughput plan,
checkpoint conversion, Hugging Face export/import and evaluation. (cli.py holds train,
params, generate and the data commands, and the exit-status contract.)"""

from __future__ import annotations

import argparse
import math

from pretrain.config import ConfigError, load_config


def _submit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.config import absolute_paths, dump_config
    from slurm.submit import JobSpec, render, sbatch, train_command

    cfg = load_config(args.config, args.overrides)
    world = cfg.parallel.world_size
    if world % args.nodes:
        raise ConfigError(f"--nodes: {args.nodes} does not divide the layout's {world} processes")
    per_node = world // args.nodes
    if args.gpus_per_node and args.gpus_per_node != per_node:
        raise ConfigError(f"--gpus-per-node: {args.gpus_per_node}, but the layout puts {per_node} "
                          f"processes on each of {args.nodes} nodes (one per GPU)")
    absolute_paths(cfg)  # the job runs in the run directory
    run_dir = Path(cfg.train.out_dir)
    spec = JobSpec(nodes=args.nodes, tasks_per_node=per_node, gpus_per_node=args.gpus_per_node,
                   cpus_per_task=args.cpus_per_task, time=args.time, partition=args.partition,
                   account=args.account, grace_s=args.grace)
    config = run_dir / "submit.yaml"
    script = render(spec, args.name or run_dir.name, run_dir, train_command(config, []))
    if args.dry_run:
        print(script, end="")
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(dump_config(cfg))
    (run_dir / "submit.sbatch").write_text(script)
    job = sbatch(run_dir / "submit.sbatch", run_dir)
    print(f"submitted job {job}: {run_dir / 'submit.sbatch'} (logs {run_dir}/slurm-{job}.out)")
    return 0


def _status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.status import run_status

    print(run_status(Path(args.run_dir)))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.action in ("collect", "fit"):
        if not args.sweep_dir:
            raise ConfigError(f"sweep {args.action}: give the sweep directory")
        if args.action == "collect":
            from pretrain.sweep.collect import collect

            collect(Path(args.sweep_dir))
        else:
            from pretrain.sweep.fit import fit_sweep

            print(fit_sweep(Path(args.sweep_dir), args.budget))
        return 0
    from pretrain.sweep.launch import run_local, submit_array, wait_note
    from pretrain.sweep.spec import expand, load_spec, write_points

    if not args.spec or args.local == args.submit:
        raise ConfigError("sweep: give --spec and exactly one of --local / --submit")
    spec = load_spec(args.spec)
    points = expand(spec)
    write_points(spec, points)
    print(f"sweep: {len(points)} points -> {spec.out_dir / 'points'}")
    if args.submit:
        print(wait_note(submit_array(spec, points), spec.out_dir))
        return 0
    run_local(points)
    from pretrain.sweep.collect import collect
    from pretrain.sweep.fit import fit_sweep

    collect(spec.out_dir)
    print(fit_sweep(spec.out_dir, args.budget))
    return 0


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


def _export(args: argparse.Namespace) -> int:
    from pretrain.hf import export

    out = export(args.checkpoint, args.out)
    print(f"Hugging Face (Ouro layout): {out / 'model.safetensors'}, {out / 'config.json'}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from pretrain.hf import import_hf

    ckpt = import_hf(args.hf, args.out, args.config)
    print(f"imported {args.hf} -> {ckpt}; continue pretraining with: pretrain train --config "
          f"{args.out}/config.yaml --resume {ckpt}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.offline import load_model
    from pretrain.evaluate import exit_table

    overrides = []
    if args.data:  # shards to measure instead of the run's data.validation
        overrides = ["data.source=shards", f"data.sources=[{{path: {args.data}}}]",
                     f"data.validation=[{{path: {args.data}}}]"]
    rules = parse_exit_rules(args.exit)
    cfg, model = load_model(args.checkpoint, overrides)
    table = exit_table(cfg, model, args.batches, rules, args.kv_cache, args.prefill)
    print(f"data: {table['data']}")
    print(f"held-out tokens: {table['tokens']:,} (after a prefill of {args.prefill} per sequence)")
    print(f"{'loop step':>10} | {'CE':>7} | {'ppl':>8}")
    for step, ce in table["steps"]:
        print(f"{step:>10} | {ce:7.4f} | {math.exp(ce):8.2f}")
    print(f"{'exit rule':>10} | {'CE':>7} | {'ppl':>8} | loops used (of {cfg.model.loops}), "
          f"decoded with the {args.kv_cache} KV cache")
    for rule, ce, loops in table["exits"]:
        print(f"{rule:>10} | {ce:7.4f} | {math.exp(ce):8.2f} | {loops:.2f}")
    return 0


def parse_exit_rules(texts: list[str]):
    """--exit values as ExitRules; a bad one is a one-line error naming the flag."""
    from pretrain.model.generate import ExitRule

    try:
        return tuple(ExitRule.parse(t) for t in texts)
    except ValueError as e:
        raise ConfigError(f"--exit: {e}") from None


def _convert(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.offline import consolidate

    layout = dict(kv.split("=", 1) for kv in args.to_layout.split(",") if "=" in kv)
    if set(layout) - {"tp", "pp", "dp"} or any(v != "1" for v in layout.values()):
        raise ConfigError(f"--to-layout: {args.to_layout!r}: only tp=1,pp=1 (consolidation) is "
                          "written offline; every layout resumes any checkpoint directly")
    print(f"consolidated checkpoint: {consolidate(args.checkpoint, args.out)}")
    return 0


def _grow(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.grow import grow

    out = grow(args.source, args.layers, args.out, args.order, args.overrides)
    print(f"grown to {args.layers} shared layers ({args.order}): {out}; continue with "
          f"pretrain train --config {out / 'config.yaml'} --resume {out}")
    return 0


def add_decoding_flags(p) -> None:
    """The KV-cache policy flag shared by `generate` and `eval` (model/generate.py)."""
    p.add_argument("--kv-cache", choices=("full", "last", "average"), default="full",
                   help="while decoding: a cache per loop, or one (last step / mean over steps)")


def add_run_commands(sub) -> None:
    pl = sub.add_parser("plan", help="predict memory, bubble, comm and MFU; rank the layouts")
    pl.add_argument("--config", required=True)
    pl.add_argument("overrides", nargs="*")
    pl.add_argument("--gpus", type=int, required=True)
    pl.add_argument("--gpu", default="h100", help="h100, h200, a100, b200")
    pl.add_argument("--global-batch", type=int, default=0, help="sequences per step")
    pl.add_argument("--top", type=int, default=10)
    pl.set_defaults(fn=_plan)
    ex = sub.add_parser("export", help="checkpoint -> Hugging Face (Ouro) safetensors + config")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True)
    ex.set_defaults(fn=_export)
    im = sub.add_parser("import", help="Hugging Face (Ouro) weights -> a step-0 checkpoint")
    im.add_argument("--hf", required=True, help="directory with config.json + *.safetensors")
    im.add_argument("--out", required=True, help="run directory to create")
    im.add_argument("--config", default=None, help="base run config (model fields come from HF)")
    im.set_defaults(fn=_import)
    ev = sub.add_parser("eval", help="held-out loss per loop step and per early-exit rule")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default="", help="held-out shards directory (default: the run's "
                                               "data.validation)")
    ev.add_argument("--batches", type=int, default=8)
    ev.add_argument("--exit", nargs="+", default=["gate:0.3", "gate:0.5", "gate:0.7", "gate:0.9"],
                    help="exit rules: gate:Q (cumulative exit probability), delta:EPS "
                         "(|h_t - h_t-1| < EPS), fixed:N, all")
    add_decoding_flags(ev)
    ev.add_argument("--prefill", type=int, default=0,
                    help="tokens of each sequence prefilled (every loop) before decoding")
    ev.set_defaults(fn=_eval)
    sb = sub.add_parser("submit", help="submit a run to SLURM (auto-requeue on preemption)")
    sb.add_argument("--config", required=True)
    sb.add_argument("overrides", nargs="*")
    sb.add_argument("--nodes", type=int, default=1)
    sb.add_argument("--gpus-per-node", type=int, default=0)
    sb.add_argument("--cpus-per-task", type=int, default=1)
    sb.add_argument("--time", default="01:00:00", help="HH:MM:SS or D-HH:MM:SS")
    sb.add_argument("--partition", default="")
    sb.add_argument("--account", default="")
    sb.add_argument("--grace", type=int, default=120, help="seconds of warning (USR1) before the limit")
    sb.add_argument("--name", default="", help="job name (default: the run directory's name)")
    sb.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    sb.set_defaults(fn=_submit)
    sw = sub.add_parser("sweep", help="scaling-law sweeps: run/submit points, collect, fit")
    sw.add_argument("action", nargs="?", choices=("run", "collect", "fit"), default="run")
    sw.add_argument("sweep_dir", nargs="?", help="sweep directory (collect, fit)")
    sw.add_argument("--spec", help="sweep spec YAML (run)")
    sw.add_argument("--local", action="store_true", help="train the points here, one by one")
    sw.add_argument("--submit", action="store_true", help="submit one SLURM job array")
    sw.add_argument("--budget", type=float, default=None, help="FLOPs for the compute optimum")
    sw.set_defaults(fn=_sweep)
    st = sub.add_parser("status", help="step, tokens, loss, checkpoint and SLURM state of a run")
    st.add_argument("run_dir")
    st.set_defaults(fn=_status)
    tools = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(
        dest="checkpoint_command", required=True)
    conv = tools.add_parser("convert", help="consolidate a sharded checkpoint into one file of "
                                            "full tensors")
    conv.add_argument("checkpoint", help="checkpoint, checkpoints root or run directory")
    conv.add_argument("--to-layout", default="tp=1,pp=1")
    conv.add_argument("--out", required=True, help="checkpoints root to write into")
    conv.set_defaults(fn=_convert)
    gr = tools.add_parser("grow", help="upcycle to a deeper shared block by layer duplication")
    gr.add_argument("--from", dest="source", required=True, help="checkpoint (any layout)")
    gr.add_argument("--layers", type=int, required=True, help="new model.num_layers (a multiple)")
    gr.add_argument("--order", default="stack", help="stack (l0..lL-1 repeated) or interleave")
    gr.add_argument("--out", required=True, help="checkpoints root to write into")
    gr.add_argument("overrides", nargs="*", help="config changes for the grown run, e.g. "
                                                 "model.loops=4 objective.beta=0.05")
    gr.set_defaults(fn=_grow)
