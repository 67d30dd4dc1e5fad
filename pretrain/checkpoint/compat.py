"""Which config changes a checkpoint survives, and the checkpoint a run resumes from."""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import store
from pretrain.config import Config, load_config

# model fields that change a weight's shape or meaning: a checkpoint never loads across them
# (loops, max_seq_len, rope_theta, dropout may change: same weights, a different run)
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "ffn_hidden_size", "sandwich_norm", "tie_embeddings",
                "prelude_layers", "coda_layers", "loop_mode", "qk_norm", "norm_weights", "mlp",
                "rope_reverse", "norm_between_loops")


def incompatibility(saved: Config, cfg: Config) -> str | None:
    """The first architecture field that differs, as one line; None if compatible."""
    for name in ARCHITECTURE:
        a, b = getattr(saved.model, name), getattr(cfg.model, name)
        if a != b:
            return f"model.{name}: the checkpoint has {a!r}, this run {b!r}"
    return None


def resume_point(where: str, root: Path, cfg: Config) -> Path | None:
    """The checkpoint `--resume where` names -- 'auto': the newest complete one under `root`
    (None: there is none, start fresh); else a path as users type it (store.resolve) -- once
    it is known to fit `cfg`."""
    path = store.newest(root) if where == "auto" else store.resolve(where)
    if path is not None:
        why = incompatibility(load_config(path / "config.yaml"), cfg)
        if why:
            raise store.CheckpointError(f"{path}: incompatible checkpoint: {why}")
    return path
