"""`pretrain train` and `pretrain params`: run a config, or count what it would run."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

from core.durable import open_no_link
from core.exit_codes import (
    EXIT_DIVERGED,
    EXIT_INTERRUPTED,
    EXIT_PEER_LOST,
    EXIT_PREEMPTED,
    PREEMPTED_MARKER,
)


def _train(args: argparse.Namespace) -> int:
    from pretrain.config import dump_config, load_config
    from pretrain.run.preemption import PreemptionSignal

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    signals = PreemptionSignal()  # live from setup until the final save has been waited on
    signals.install()
    try:
        return _run(cfg, args, signals)
    finally:
        signals.uninstall()


def _policies(cfg) -> str:
    """The run header's line of where things go: out_dir, the data, checkpoints, evaluation."""
    d, t = cfg.data, cfg.train
    data = (f"text {', '.join(d.paths)}" if d.source == "text" else "shards " + ", ".join(
        f"{s.path} (weight {s.weight:g})" for s in d.sources))
    saves = [f"every {t.checkpoint_every} steps"] if t.checkpoint_every else []
    if t.checkpoint_minutes:
        saves.append(f"every {t.checkpoint_minutes:g} min")
    held = ", ".join(s.path for s in d.validation) or "none configured"
    evals = f"every {t.eval_every} steps on {held}" if t.eval_every else f"off (data.validation: {held})"
    return (f"out_dir {t.out_dir}; data: {data}; checkpoints: {', '.join([*saves, 'at the end'])}, "
            f"keep {t.keep_last or 'all'}; validation: {evals}")


def _resume_command(args: argparse.Namespace) -> str:
    """The command that continues this run, shell-quoted."""
    return shlex.join(["pretrain", "train", "--config", str(args.config), *args.overrides,
                       "--resume", "auto"])


def _own_run_dir(trainer, resume: str, overwrite: bool):
    """Lock train.out_dir for this job (rank 0) and check a fresh start holds no other run's
    checkpoints (pretrain/run/run_dir.py); every rank gets the verdict. The lock, or None."""
    from parallelism.topology import on_main
    from pretrain.checkpoint import store
    from pretrain.run.run_dir import own_run

    out = trainer.out_dir
    fresh = resume == "none" or (resume != "auto" and store.resolve(resume).parent.resolve()
                                 != (out / "checkpoints").resolve())
    held = []

    def own():
        lock, note = own_run(out, fresh, overwrite)
        held.append(lock)
        return note

    note = on_main(trainer.topo, own)
    if note:
        trainer.log(note)
    return held[0] if held else None


def _run(cfg, args: argparse.Namespace, signals) -> int:
    from parallelism.topology import shutdown
    from pretrain.kernels import describe
    from pretrain.model.flops import count_parameters
    from pretrain.run.preemption import Preempted
    from pretrain.train import Trainer, TrainingDiverged

    trainer = Trainer(cfg, preemption=signals)
    say = print if trainer.topo.is_main else (lambda *a, **k: None)
    m = cfg.model
    if "SLURM_JOB_ID" in os.environ:
        say(f"slurm job {os.environ['SLURM_JOB_ID']}, restart "
            f"{os.environ.get('SLURM_RESTART_COUNT', '0')}")
    say(f"looped LM: {m.num_layers} shared layers x {m.loops} loops, hidden {m.hidden_size}; "
          f"{count_parameters(m)['total']:,} parameters; "
          f"device {trainer.device}; {trainer.tokens_per_step:,} tokens/step; layout tensor "
          f"{trainer.topo.tp} x pipeline {trainer.topo.pp} x data {trainer.topo.dp}")
    say(describe(cfg, trainer.device, trainer.optimizer, trainer.topo.dp))
    say(_policies(cfg))
    resume = args.resume or ("auto" if "SLURM_JOB_ID" in os.environ else "none")
    lock = trainer.run_lock = _own_run_dir(trainer, resume, args.overwrite)
    try:
        if resume != "none":
            trainer.resume(resume)
        if trainer.step >= cfg.train.max_steps:
            say(f"pretrain: nothing to train: the run is at step {trainer.step} of "
                f"train.max_steps {cfg.train.max_steps}; raise train.max_steps to continue it")
            shutdown(trainer.topo)
            return 0
        summary = trainer.fit()
    except TrainingDiverged as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as e:
        shutdown(trainer.topo)
        if e.interrupted:
            say(f"pretrain: {e}; continue with: {_resume_command(args)}; exit {EXIT_INTERRUPTED}")
            return EXIT_INTERRUPTED
        if trainer.topo.is_main:  # for the batch script (core/exit_codes.py)
            with open_no_link(trainer.out_dir / PREEMPTED_MARKER) as fh:
                fh.write(f"{e}\n")
        say(f"pretrain: {e}; exit {EXIT_PREEMPTED} (requeue, then --resume auto)")
        return EXIT_PREEMPTED
    except RuntimeError:  # a collective failed: was it a dead peer?
        watchdog = trainer.topo.watchdog
        why = watchdog.diagnose() if watchdog is not None else None
        if why is None:
            raise
        print(f"pretrain: error: {why}", file=sys.stderr)
        return EXIT_PEER_LOST
    finally:
        if lock is not None:
            lock.release()
    shutdown(trainer.topo)
    first = summary.history[0]["train/loss"] if summary.history else float("nan")
    say(f"done: {summary.steps} steps, loss {first:.4f} -> {summary.final_loss:.4f}, "
        f"{summary.skipped_steps} skipped")
    say(f"TensorBoard logs: {summary.tensorboard_dir}  (tensorboard --logdir {summary.tensorboard_dir})")
    say(f"checkpoint: {summary.checkpoint}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.model.flops import count_parameters, run_flops_per_token
    from pretrain.model.recurrence import Recurrence, step_samples

    cfg = load_config(args.config, args.overrides)
    report = count_parameters(cfg.model)
    report["flops_per_token"] = run_flops_per_token(cfg)
    report["loops"] = cfg.model.loops
    # a training step's expected loop steps, and those with a backward (model/recurrence.py)
    report["expected_loops"], report["expected_backprop_loops"] = Recurrence.of(cfg).expected(
        step_samples(cfg))
    report["seq_len"] = cfg.train.seq_len
    print(json.dumps(report, indent=2))
    return 0


def add_commands(sub) -> None:
    for name, fn, helptext in (("train", _train, "train a looped LM"),
                               ("params", _params, "print parameter and FLOP counts as JSON")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.loops=2")
        p.set_defaults(fn=fn)
        if name == "train":
            p.add_argument("--resume", default=None,
                           help="auto (newest complete checkpoint of train.out_dir), a checkpoint "
                                "or run directory, or none; default: auto under SLURM, else none")
            p.add_argument("--overwrite", action="store_true",
                           help="start afresh in a train.out_dir that holds another run: the old "
                                "run is moved aside (renamed, not deleted)")
            p.add_argument("--print-config", action="store_true",
                           help="print the resolved config (base files, defaults and overrides "
                                "applied) as YAML and exit without training")
