"""The data section of the config, validated beside the loader it configures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from core.config_schema import require


@dataclass
class SourceConfig:
    path: str = ""  # directory holding manifest.json (made by `pretrain data tokenize`)
    weight: float = 1.0
    # how to open a shard when it is not a local file next to the manifest, e.g.
    # "pipe:aws s3 cp s3://bucket/corpus/{shard} -" ({shard}: its name, {dir}: path above)
    url_template: str = ""


@dataclass
class DataConfig:
    source: Literal["text", "shards"] = "text"
    paths: list[str] = field(default_factory=lambda: ["data/sample.txt"])  # source: text
    sources: list[SourceConfig] = field(default_factory=list)  # source: shards
    tokenizer: str = ""  # tokenizer.json whose hash every manifest must carry (optional)
    shuffle: bool = True
    shuffle_buffer: int = 1024  # windows shuffled together (bounded shuffle buffer)
    mixture_window: int = 1000  # proportions of the sources are exact over every such window
    num_workers: int = 2
    prefetch: int = 4  # micro-batches in flight per worker
    on_error: Literal["raise", "skip"] = "raise"
    # held-out data for train.eval_every, `pretrain eval` and `sweep collect`: shard directories
    # (source: shards; `pretrain data tokenize --validation-fraction` writes one) or text files
    # (source: text), read in order, one after another (weights are not used)
    validation: list[SourceConfig] = field(default_factory=list)


def validate_data(d: DataConfig) -> None:
    if d.source == "text":
        require(len(d.paths) >= 1, "data.paths", "needs at least one path")
    else:
        require(len(d.sources) >= 1, "data.sources", "needs at least one {path, weight}")
        for i, src in enumerate(d.sources):
            require(bool(src.path), f"data.sources[{i}].path", "must not be empty")
            require(src.weight > 0, f"data.sources[{i}].weight", f"must be > 0, got {src.weight}")
        require(d.mixture_window >= len(d.sources), "data.mixture_window",
                f"must be >= the number of sources ({len(d.sources)})")
    for i, src in enumerate(d.validation):
        require(bool(src.path), f"data.validation[{i}].path", "must not be empty")
    require(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    require(d.prefetch >= 1, "data.prefetch", "must be >= 1")


def shell_commands(d: DataConfig) -> list[str]:
    """The fields that run a shell command (a `pipe:` url_template), as `field: template`: what
    a config from elsewhere (a checkpoint's) must not run unless the user says so."""
    return [f"data.{kind}[{i}].url_template: {s.url_template}"
            for kind, sources in (("sources", d.sources), ("validation", d.validation))
            for i, s in enumerate(sources) if s.url_template.startswith("pipe:")]
