"""`pretrain submit`, `pretrain status` and `pretrain sweep`: runs on SLURM and sweeps of them."""

from __future__ import annotations

import argparse
import sys

from core.config_schema import ConfigError
from pretrain.cli.flags import at_least


def _cpus_per_rank(cfg) -> int:
    """The trainer, and the streaming loader's workers when it reads shards."""
    return 1 + (cfg.data.num_workers if cfg.data.source == "shards" else 0)


def _submit(args: argparse.Namespace) -> int:
    import shlex
    from pathlib import Path

    from pretrain.config import absolute_paths, dump_config, load_config
    from slurm.submit import JobSpec, render, sbatch, sbatch_command, train_command

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
                   cpus_per_task=args.cpus_per_task or _cpus_per_rank(cfg),
                   time=args.time, partition=args.partition, account=args.account,
                   grace_s=args.grace)
    config = run_dir / "submit.yaml"
    script = render(spec, args.name or run_dir.name, run_dir, train_command(config, []))
    if args.dry_run:
        command = shlex.join(sbatch_command(run_dir / "submit.sbatch", run_dir))
        print(script, end="")
        print(f"(submitted as: {command})", file=sys.stderr)  # stdout stays the script
        return 0
    run_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(dump_config(cfg))
    (run_dir / "submit.sbatch").write_text(script)
    job = sbatch(run_dir / "submit.sbatch", run_dir)
    print(f"submitted job {job}: {run_dir / 'submit.sbatch'} (logs {run_dir}/slurm-{job}.out)")
    return 0


def _status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from pretrain.run.status import is_tokenisation, run_status, tokenisation_status
    from pretrain.sweep.collect import POINTS_INDEX
    from pretrain.sweep.status import sweep_status

    path = Path(args.run_dir)
    if is_tokenisation(path):
        print(tokenisation_status(path))
    else:
        print(sweep_status(path) if (path / POINTS_INDEX).is_file() else run_status(path))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.action in ("collect", "fit"):
        if not args.sweep_dir:
            raise ConfigError(f"sweep {args.action}: give the sweep directory")
        if args.action == "collect":
            from pretrain.sweep.collect import collect

            collect(Path(args.sweep_dir), allow_commands=args.allow_commands)
        else:
            print(_fit(Path(args.sweep_dir), args.law or "chinchilla", args.budget))
        return 0
    from pretrain.sweep.launch import run_local, submit_array, wait_note
    from pretrain.sweep.spec import expand, load_spec, write_points

    if not args.spec or args.local == args.submit:
        raise ConfigError("sweep: give --spec and exactly one of --local / --submit")
    spec = load_spec(args.spec)
    points = expand(spec)
    write_points(spec, points, args.overwrite)
    print(f"sweep: {len(points)} points -> {spec.out_dir / 'points'}")
    if args.submit:
        print(wait_note(submit_array(spec, points), spec.out_dir))
        return 0
    run_local(points)
    from pretrain.sweep.collect import collect

    collect(spec.out_dir, allow_commands=True)  # the points this command just trained
    print(_fit(spec.out_dir, args.law or spec.law, args.budget))
    return 0


def _fit(sweep_dir, law: str, budget: float | None) -> str:
    """The report of `law`'s fit: Chinchilla's L(N, D) + the loop law, or the iso-depth law."""
    if law == "iso-depth":
        from pretrain.sweep.iso_depth import fit_iso_depth_sweep

        return fit_iso_depth_sweep(sweep_dir)
    from pretrain.sweep.fit import fit_sweep

    return fit_sweep(sweep_dir, budget)


def add_commands(sub) -> None:
    sb = sub.add_parser("submit", help="submit a run to SLURM (auto-requeue on preemption)")
    sb.add_argument("--config", required=True, help="YAML config file")
    sb.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.loops=2")
    sb.add_argument("--nodes", type=at_least(1), default=1, help="SLURM nodes")
    sb.add_argument("--gpus-per-node", type=at_least(0), default=0,
                    help="GPUs (= ranks) per node; 0: one CPU rank per node")
    sb.add_argument("--cpus-per-task", type=at_least(0), default=0,
                    help="CPU cores per rank (0: the trainer's, plus data.num_workers when it "
                         "streams shards)")
    sb.add_argument("--time", default="01:00:00", help="HH:MM:SS or D-HH:MM:SS")
    sb.add_argument("--partition", default="", help="SLURM partition")
    sb.add_argument("--account", default="", help="SLURM account")
    sb.add_argument("--grace", type=at_least(1), default=120,
                    help="seconds of warning (USR1) before the limit")
    sb.add_argument("--name", default="", help="job name (default: the run directory's name)")
    sb.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    sb.set_defaults(fn=_submit)
    sw = sub.add_parser("sweep", help="scaling-law sweeps: run/submit points, collect, fit")
    sw.add_argument("action", nargs="?", choices=("run", "collect", "fit"), default="run")
    sw.add_argument("sweep_dir", nargs="?", help="sweep directory (collect, fit)")
    sw.add_argument("--spec", help="sweep spec YAML (run)")
    sw.add_argument("--local", action="store_true", help="train the points here, one by one")
    sw.add_argument("--submit", action="store_true", help="submit one SLURM job array")
    sw.add_argument("--overwrite", action="store_true",
                    help="points whose run holds checkpoints of a different config are moved aside")
    sw.add_argument("--allow-commands", action="store_true",
                    help="collect: run the pipe: url_templates of the points' data configs (a "
                         "sweep directory from elsewhere may name any command)")
    sw.add_argument("--budget", type=at_least(0.0, float), default=None, help="FLOPs for the compute optimum")
    sw.add_argument("--law", choices=("chinchilla", "iso-depth"), default=None,
                    help="fit L(N, D) + the loop law, or the iso-depth law with phi (default: "
                         "the spec's `law`, else chinchilla)")
    sw.set_defaults(fn=_sweep)
    st = sub.add_parser("status", help="step, tokens, loss, checkpoint and SLURM state of a run "
                                       "(or the parts done of a tokenisation job)")
    st.add_argument("run_dir")
    st.set_defaults(fn=_status)
