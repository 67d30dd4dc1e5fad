"""`pretrain` command line, one module per command group: train.py (train, params),
decode.py (generate, eval), data.py (data ...), runs.py (submit, status, sweep), plan.py,
checkpoints.py (export, import, checkpoint ...). Each adds its commands with `add_commands`.

Exit status (core/exit_codes.py): 2 a configuration, data or checkpoint problem (one line
naming the field, file or shard; no traceback); 3 the loss diverged; 4 a peer rank died
(named); 75 preempted by SIGTERM/SIGUSR1 after a checkpoint was sealed (requeue and
`--resume auto`).
"""

from __future__ import annotations

import argparse
import sys

from core.exit_codes import EXIT_CONFIG
from data_pipeline.badinput import DataError
from pretrain.checkpoint import CheckpointError
from pretrain.cli import checkpoints, data, decode, plan, runs, train
from pretrain.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain looped language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, decode, plan, checkpoints, runs, data):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
