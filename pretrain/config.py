"""The run configuration: a YAML file plus dotted overrides, validated before any work starts.

Each section is a dataclass beside the code it configures, validated there (model/config.py,
optim.py, data_pipeline/config.py, parallelism/config.py); this module assembles them, holds
the trainer's own section and reads files (core/config_schema.py turns mappings into sections).
Every problem raises `ConfigError` whose message is one line naming the field, so the CLI can
print it and exit 2 without a traceback (a typo in a sweep must not cost a queued GPU job).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from core.config_schema import ConfigError, Override, build, load_tree, move_keys, require
from data_pipeline.config import DataConfig, SourceConfig, validate_data
from parallelism.config import ParallelConfig, validate_layout
from pretrain.downstream.config import DownstreamConfig, validate_downstream
from pretrain.model.config import (
    ModelConfig,
    ObjectiveConfig,
    validate_model,
    validate_objective,
)
from pretrain.model.families import check_family
from pretrain.model.generate import ExitRule
from pretrain.model.recurrence import MOVED, Recurrence, RecurrenceConfig, validate_recurrence
from pretrain.optim import OptimConfig, validate_optim

__all__ = ["Config", "ConfigError", "DataConfig", "ModelConfig", "ObjectiveConfig",
           "OptimConfig", "ParallelConfig", "RecurrenceConfig", "SourceConfig", "TrainConfig",
           "load_config"]


@dataclass
class TrainConfig:
    seed: int = 1234
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seq_len: int = 128
    log_every: int = 10
    out_dir: str = "runs/default"
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 0  # steps between sharded checkpoints; 0: by time and at the end
    checkpoint_minutes: float = 30.0  # a checkpoint once this long since the last; 0: never
    keep_last: int = 3  # complete checkpoints kept on disk; 0: all
    async_checkpoint: bool = False  # write checkpoints in the background while training goes on
    peak_flops: float = 0.0  # per device, for MFU; 0: the GPU table, or measured on a CPU
    eval_every: int = 0  # steps between validation passes over data.validation; 0: none
    eval_tokens: int = 1 << 20  # tokens per validation pass (at most the whole validation data)
    # exit criteria whose validation CE and mean loops are logged (gate:Q, fixed:N; the same
    # readout as `pretrain eval` without a prefix: every loop runs, the exit picks the step)
    eval_exits: list[str] = field(default_factory=lambda: ["gate:0.5", "gate:0.9"])
    wandb_project: str = ""  # log to Weights & Biases too (pip install '.[wandb]')
    # what backward keeps (pretrain/model/memory.py): none | selective (attention core) |
    # full (every layer) | loops (the layers of all but the last recompute_keep_last_loops)
    recompute: Literal["none", "selective", "full", "loops"] = "none"
    recompute_keep_last_loops: int = 1
    loss_chunk_tokens: int = 0  # readout + CE per chunk of this many tokens; 0: whole logits
    # bf16: autocast (fp32 master weights, optimizer state and loss); fp32: no autocast
    precision: Literal["bf16", "fp32"] = "fp32"
    compile: bool = False  # torch.compile each decoder layer (one graph for every loop)
    # lm-eval tasks during training (pretrain/downstream/config.py, callbacks/downstream.py)
    downstream: DownstreamConfig = field(default_factory=DownstreamConfig)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    recurrence: RecurrenceConfig = field(default_factory=RecurrenceConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# fields that no longer exist, and what replaced them
REMOVED = {
    "model.fully_looped": "removed: the Fully Looped Transformer is model.loop_mode=flt "
                          "(or flt_res, lt, lt_i, lt_ia)",
    "model.attention_injection": "removed: attention injection is model.loop_mode=lt_ia "
                                 "(queries of the first layer from the previous loop) or flt",
}


def config_from_tree(tree: dict[str, Any], where: str = "config") -> Config:
    """The sections built from a mapping, keys of the earlier form moved to their place
    (`MOVED`) with a one-line notice on stderr naming the new keys; not yet validated."""
    moved = move_keys(tree, MOVED)
    if moved:
        print(f"notice: {where}: {', '.join(f'{a} is now {b}' for a, b in moved)} (loaded as "
              "such; write the new keys)", file=sys.stderr)
    return build(Config, tree, "", REMOVED)


def load_config(path: str | Path | None = None, overrides: Sequence[Override] = (),
                bases: bool = True) -> Config:
    """Read YAML at `path` (optional), apply `a.b=value` overrides, build and validate;
    `bases=False` for a file from elsewhere (a checkpoint's): a `base:` in it is refused."""
    cfg = config_from_tree(load_tree(path, overrides, bases), str(path or "config"))
    validate(cfg)
    return cfg


def validate_train(t: TrainConfig, max_seq_len: int) -> None:
    require(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    for name in ("micro_batch_size", "grad_accum_steps", "seq_len", "log_every", "max_bad_steps"):
        require(getattr(t, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    require(t.seq_len <= max_seq_len, "train.seq_len",
            f"{t.seq_len} exceeds model.max_seq_len {max_seq_len}")
    require(bool(t.out_dir), "train.out_dir", "must not be empty")
    for name in ("checkpoint_every", "checkpoint_minutes", "keep_last", "eval_every"):
        require(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    require(t.eval_tokens >= t.seq_len, "train.eval_tokens",
            f"must be >= train.seq_len {t.seq_len}, got {t.eval_tokens}")
    for i, text in enumerate(t.eval_exits):
        try:
            rule = ExitRule.parse(text)
        except ValueError as e:
            raise ConfigError(f"train.eval_exits[{i}]: {e}") from None
        require(rule.kind not in ("delta", "kl"), f"train.eval_exits[{i}]",
                f"{rule.kind} needs every step's hidden states or logits: use `pretrain eval "
                f"--exit {rule}`")


def validate_memory(t: TrainConfig, loops: int, tensor: int) -> None:
    """Recompute, chunked loss and compile: each field's range, and the pairs that cannot work."""
    require(0 <= t.recompute_keep_last_loops <= loops, "train.recompute_keep_last_loops",
            f"must be in 0..model.loops {loops}, got {t.recompute_keep_last_loops}")
    require(t.loss_chunk_tokens >= 0, "train.loss_chunk_tokens",
            f"must be >= 0, got {t.loss_chunk_tokens}")
    require(not (t.compile and tensor > 1), "train.compile",
            f"cannot compile megatron-core's tensor-parallel layers (parallel.tensor {tensor}): "
            "use train.compile=false with parallel.tensor > 1")
    require(not (t.compile and t.recompute == "selective"), "train.compile",
            "train.recompute=selective checkpoints inside the compiled layer: use full or loops "
            "with train.compile")


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express, section by section."""
    validate_model(cfg.model)
    validate_recurrence(cfg.recurrence, cfg.model)
    check_family(cfg.model, cfg.recurrence.per_sequence)
    validate_objective(cfg.objective, cfg.model, cfg.recurrence.per_sequence)
    validate_train(cfg.train, cfg.model.max_seq_len)
    validate_optim(cfg.optim, cfg.parallel.zero_stage, cfg.parallel.tensor)
    validate_memory(cfg.train, cfg.model.loops, cfg.parallel.tensor)
    validate_downstream(cfg.train.downstream)
    validate_data(cfg.data)
    if cfg.train.eval_every:
        require(bool(cfg.data.validation), "train.eval_every",
                "needs data.validation (held-out data: `pretrain data tokenize "
                "--validation-fraction` writes it)")
    validate_layout(cfg.parallel, cfg.model, cfg.train.seq_len, cfg.train.grad_accum_steps,
                    Recurrence.of(cfg).varies)


def absolute_paths(cfg: Config) -> None:
    """Resolve the config's relative file paths against the current directory, for runs that
    start elsewhere (a SLURM job in its run directory, a sweep point)."""
    cfg.train.out_dir = str(Path(cfg.train.out_dir).resolve())
    cfg.data.paths = [str(Path(p).resolve()) for p in cfg.data.paths]
    for src in (*cfg.data.sources, *cfg.data.validation):
        if "://" not in src.path and not src.path.startswith("pipe:"):
            src.path = str(Path(src.path).resolve())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())


def dotted_fields(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config's `to_dict()` (or any part of it) as {"section.field": value}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(dotted_fields(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
