"""`pretrain doctor`: whether this node is set up for a run (pretrain/planning/doctor.py)."""

from __future__ import annotations

import argparse


def _doctor(args: argparse.Namespace) -> int:
    from pretrain.config import load_config
    from pretrain.planning.doctor import diagnose, report

    cfg = load_config(args.config, args.overrides) if args.config else None
    text, status = report(diagnose(cfg))
    print(text)
    return status


def add_commands(sub) -> None:
    dr = sub.add_parser("doctor", help="check this node for a run: CUDA, NCCL, packages, kernels, "
                                       "launcher; a verdict (exit 1: blocked)")
    dr.add_argument("--config", default="", help="a run config: check that run's needs")
    dr.add_argument("overrides", nargs="*")
    dr.set_defaults(fn=_doctor)
