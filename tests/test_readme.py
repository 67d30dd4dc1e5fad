"""The README's "Using it" commands cannot rot silently: every `pretrain ...` line of its shell
blocks parses with today's flags, and every config, spec and task file it names exists. (Running
them all needs the demo's outputs, GPUs and downloaded weights: the commands that can run here
run in their own tests -- test_cli, test_hf, test_sweep, test_slurm, test_huginn.)"""

from __future__ import annotations

import re
import shlex

from pretrain.cli import build_parser
from tests.conftest import ROOT

PLACEHOLDERS = ("X", "...", "my_task.yaml")  # the README's stand-ins for the user's own


def readme_commands() -> list[str]:
    """Each `pretrain ...` command of the "Using it" section's bash blocks, continuation lines
    joined, `a && b` split, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Using it\n")[1].split("\n## ")[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:1] == ["pretrain"]:
                    commands.append(shlex.join(words))
    return commands


def test_every_readme_command_parses_and_names_files_that_exist():
    commands = readme_commands()
    assert len(commands) >= 25
    parser = build_parser()
    for command in commands:
        argv = shlex.split(command)[1:]
        if any(p in argv for p in PLACEHOLDERS[:2]):
            continue
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            raise AssertionError(f"README: `{command}` does not parse (exit {e.code})") from None
        files = ("--config", "--spec", *(["--tasks"] if argv[0] == "eval" else []))
        for flag, value in zip(argv, argv[1:], strict=False):
            if flag in files and value not in PLACEHOLDERS:
                assert (ROOT / value).is_file(), f"README: `{command}`: {value} is not a file"
