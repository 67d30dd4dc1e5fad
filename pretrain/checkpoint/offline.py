"""Single-process use of sharded checkpoints: the full model for generation, consolidation.

The entries are layout-free (see parallelism/sharded_state.py), so one process reads any
checkpoint into full tensors; DCP assembles the TP shards and PP stages it overlaps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from core.config_schema import Override
from parallelism.sharded_state import ShardedState
from parallelism.topology import Topology
from pretrain.checkpoint import store
from pretrain.checkpoint.checkpointer import Checkpointer
from pretrain.checkpoint.compat import saved_config
from pretrain.checkpoint.metadata import read_metadata
from pretrain.checkpoint.record import fresh_trainer_state, make_record
from pretrain.config import Config, ConfigError, dump_config
from pretrain.model.looped import LoopedLM

PROGRESS_BYTES = 256 * 2**20
"""Reads and writes of at least this size say what they do and how long it took (stderr)."""


@contextmanager
def timed(what: str, nbytes: int) -> Iterator[None]:
    """Work that is one call over a large checkpoint (a DCP load or save, a safetensors file):
    a line when it starts, with its size, and one when it ends, with its time and rate."""
    if nbytes < PROGRESS_BYTES:
        yield
        return
    print(f"{what} ({nbytes / 1e9:.2f} GB) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    yield
    took = time.perf_counter() - start
    print(f"  done in {took:.1f} s ({nbytes / 1e6 / max(took, 1e-6):.0f} MB/s)", file=sys.stderr,
          flush=True)


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _read(path: Path, entries: dict[str, torch.Tensor]) -> None:
    """Fill `entries` from the checkpoint at `path` (one process, any saved layout)."""
    with timed(f"reading {path}", sum(f.stat().st_size for f in path.iterdir() if f.is_file())):
        Checkpointer(path.parent, Topology(), local=True).load(path, entries)


def _write(root: Path, step: int, entries: dict[str, torch.Tensor], meta: dict, cfg: str) -> Path:
    with timed(f"writing {store.step_dir(root, step)}", tensor_bytes(entries)):
        Checkpointer(root, Topology(), local=True, log=lambda _: None).save(step, entries, meta, cfg)
    return store.step_dir(root, step)


def saved_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Name -> global shape and dtype of every tensor entry in a checkpoint."""
    md = read_metadata(path / ".metadata")
    return {k: v for k, v in md.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def saved_tensors(path: Path) -> dict[str, torch.Size]:
    return {k: v.size for k, v in saved_metadata(path).items()}


def refuse_shell_commands(where: str | Path, command: str, hint: str) -> None:
    """A checkpoint's config may come from anyone: its `pipe:` url_templates are shell
    commands, which `command` runs only when the user says so (`hint`)."""
    from data_pipeline.config import shell_commands

    path = store.resolve(where)
    commands = shell_commands(saved_config(path).data)
    if commands:
        raise ConfigError(f"{path / 'config.yaml'}: {commands[0]} is a shell command; {command} "
                          f"runs none from a checkpoint's config: {hint}")


def load_model(where: str | Path, overrides: Sequence[Override] = ()) -> tuple[Config, LoopedLM]:
    """The full model of a checkpoint (any layout); `overrides` may change e.g. model.loops."""
    path = store.resolve(where)
    cfg = saved_config(path, overrides)
    model = LoopedLM(cfg.model)
    state = ShardedState(model, Topology())
    groups = state.targets(saved_tensors(path), optimizer=False)
    _read(path, {k: v for g in groups.values() for k, v in g.items()})
    state.load(groups, same_layout=False)
    return cfg, model


def consolidate(where: str | Path, out_root: str | Path) -> Path:
    """Rewrite a checkpoint as one file of full tensors (layout tp=1, pp=1, dp=1): model,
    optimizer state and record; per-rank RNG states are dropped (they belong to a layout)."""
    path = store.resolve(where)
    entries = {k: torch.empty(v.size, dtype=v.properties.dtype)
               for k, v in saved_metadata(path).items() if not k.startswith("rng/")}
    meta = store.read_meta(path)
    _read(path, entries)
    meta["layout"] = {**meta.get("layout", {}), "tensor": 1, "pipeline": 1, "data": 1}
    meta.pop("files", None)
    return _write(Path(out_root), meta["step"], entries, meta, dump_config(saved_config(path)))


def save_full_model(cfg: Config, model: LoopedLM, root: Path, step: int = 0) -> Path:
    """A model-only checkpoint of a full model (e.g. imported weights): resuming it continues
    from `step` with a fresh optimizer and the data from its start."""
    entries = {k: v for k, v in ShardedState(model, Topology()).state_dict().items()
               if k.startswith("model/")}
    meta = make_record(fresh_trainer_state(step), 0, {"tensor": 1, "pipeline": 1, "data": 1,
                                                       "zero_stage": 0, "pipeline_split": []},
                       seed=cfg.train.seed)
    return _write(root, step, entries, meta, dump_config(cfg))
