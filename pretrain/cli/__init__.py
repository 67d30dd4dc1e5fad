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
from pretrain.cli import checkpoints, data, decode, doctor, plan, runs, train
from pretrain.config import ConfigError


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line and exit 2, like every other bad input (no usage block;
    --help still prints it)."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: str) -> str:
    """`text` with every character that would break the line or drive the terminal (controls,
    line and paragraph separators) escaped: messages quote what users and files gave."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(text))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pretrain", description="Pretrain looped language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, decode, plan, checkpoints, runs, data, doctor):
        group.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad argument (2, one line printed) or --help (0): a code to
        return e.code if isinstance(e.code, int) else 0  # return, as for every other input
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"pretrain: error: {one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
