"""`train.downstream`: lm-eval tasks evaluated during training (callbacks/downstream.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

from core.config_schema import ConfigError, require
from pretrain.model.generate import ExitRule


@dataclass
class DownstreamConfig:
    every: int = 0  # steps between downstream evaluations (and at the end); 0: none
    tasks: list[str] = field(default_factory=list)  # lm-eval task names or task YAML files
    include_path: str = ""  # directory of extra lm-eval task YAMLs
    limit: int = 0  # documents per task; 0: every document
    num_fewshot: int = -1  # -1: each task's own default
    loops: list[int] = field(default_factory=list)  # loop counts; empty: model.loops
    exits: list[str] = field(default_factory=lambda: ["all"])  # exit rules, as `pretrain eval`
    batch_size: int = 8


def validate_downstream(d: DownstreamConfig) -> None:
    require(d.every >= 0, "train.downstream.every", f"must be >= 0, got {d.every}")
    require(not d.every or bool(d.tasks), "train.downstream.tasks",
            "give at least one lm-eval task (name or YAML file) when train.downstream.every > 0")
    require(d.limit >= 0, "train.downstream.limit", f"must be >= 0, got {d.limit}")
    require(d.num_fewshot >= -1, "train.downstream.num_fewshot",
            f"must be >= 0 (or -1: the task's default), got {d.num_fewshot}")
    require(all(r >= 1 for r in d.loops), "train.downstream.loops",
            f"every loop count must be >= 1, got {d.loops}")
    require(d.batch_size >= 1, "train.downstream.batch_size", f"must be >= 1, got {d.batch_size}")
    for i, text in enumerate(d.exits):
        try:
            ExitRule.parse(text)
        except ValueError as e:
            raise ConfigError(f"train.downstream.exits[{i}]: {e}") from None
