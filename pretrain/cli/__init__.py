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

from core.config_schema import ConfigError
from core.exit_codes import EXIT_CONFIG
from data_pipeline.badinput import DataError
from pretrain.cli import checkpoints, data, decode, doctor, plan, runs, train


class _Help(argparse.RawDescriptionHelpFormatter):
    """Help with each option's default where it has one worth saying; examples kept as typed."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "%(default)" not in text and "default:" not in text
                and default is not None and default is not False
                and default not in ("", argparse.SUPPRESS)):
            text += f" (default: {default})" if text else f"default: {default}"
        return text


class _Parser(argparse.ArgumentParser):
    """A bad argument is one line and exit 2, like every other bad input (no usage block;
    --help still prints it). Every command's help shows defaults and its examples."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: str) -> str:
    """`text` with every character that would break the line or drive the terminal (controls,
    line and paragraph separators) escaped: messages quote what users and files gave."""
    return "".join(c if c.isprintable() or c == " " else ascii(c)[1:-1] for c in str(text))


# what `pretrain <command> --help` ends with (the README's "Using it" runs the same)
EXAMPLES = {
    "train": ["pretrain train --config configs/tiny.yaml model.loops=4 train.max_steps=100",
              "pretrain train --config configs/tiny.yaml --print-config",
              "pretrain train --config configs/tiny.yaml --resume auto"],
    "generate": ['pretrain generate --checkpoint runs/demo --prompt "The Fox" --exit gate:0.6'],
    "eval": ["pretrain eval --checkpoint runs/demo",
             "pretrain eval --checkpoint runs/demo --tasks my_task.yaml --loops 1 3"],
    "plan": ["pretrain plan --config configs/ouro-1.4b.yaml --gpus 64 --gpu h100 "
             "--global-batch 512"],
    "export": ["pretrain export --checkpoint runs/demo --out hf/"],
    "submit": ["pretrain submit --config configs/ouro-1.4b.yaml --nodes 8 --gpus-per-node 8 "
               "--dry-run"],
    "sweep": ["pretrain sweep --spec configs/sweeps/tiny-cpu.yaml --local",
              "pretrain sweep collect runs/sweeps/tiny-cpu"],
    "status": ["pretrain status runs/demo"],
}


def build_parser() -> argparse.ArgumentParser:
    from pretrain import __version__

    parser = _Parser(prog="pretrain", description="Pretrain looped language models.")
    parser.add_argument("--version", action="version", version=f"pretrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (train, decode, plan, checkpoints, runs, data, doctor):
        group.add_commands(sub)
    for name, lines in EXAMPLES.items():
        sub.choices[name].epilog = "examples:\n" + "\n".join(f"  {line}" for line in lines)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad argument (2, one line printed) or --help (0): a code to
        return e.code if isinstance(e.code, int) else 0  # return, as for every other input
    from pretrain.checkpoint import CheckpointError  # torch: after parsing (--help stays fast)

    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"pretrain: error: {one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
