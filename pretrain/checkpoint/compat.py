"""Which config changes a checkpoint survives, and the checkpoint a run resumes from."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from core.config_schema import Override
from pretrain.checkpoint import store
from pretrain.config import Config, ConfigError, dotted_fields, load_config

# model fields that change a weight's shape or meaning: a checkpoint never loads across them
# (loops, max_seq_len, rope_theta, dropout may change: same weights, a different run)
ARCHITECTURE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                "head_dim", "ffn_hidden_size", "sandwich_norm", "tie_embeddings",
                "prelude_layers", "coda_layers", "loop_mode", "qk_norm", "norm_weights", "mlp",
                "rope_reverse", "norm_between_loops", "residual_scale")


def incompatibility(saved: Config, cfg: Config) -> str | None:
    """The first architecture field that differs, as one line; None if compatible."""
    for name in ARCHITECTURE:
        a, b = getattr(saved.model, name), getattr(cfg.model, name)
        if a != b:
            return f"model.{name}: the checkpoint has {a!r}, this run {b!r}"
    return None


def saved_config(path: Path, overrides: Sequence[Override] = ()) -> Config:
    """A checkpoint's config.yaml, read as the untrusted file it is: whole (a `base:` naming
    another file is refused), validated like any config."""
    return load_config(path / "config.yaml", overrides, bases=False)


class Incompatible(store.CheckpointError):
    """A sound checkpoint of another architecture (no fallback past it: the run is wrong)."""


def require_fit(path: Path, cfg: Config) -> Config:
    """The checkpoint's config; Incompatible if it is of another architecture; a plain
    CheckpointError (a damaged checkpoint: resume falls back past it) if its config.yaml does
    not read."""
    where = path / "config.yaml"
    try:
        if not where.read_text(errors="replace").strip():
            raise ConfigError(f"{where}: empty")
        saved = saved_config(path)
    except (OSError, ConfigError) as e:
        raise store.CheckpointError(f"damaged checkpoint config: {e}") from None
    why = incompatibility(saved, cfg)
    if why:
        raise Incompatible(f"{path}: incompatible checkpoint: {why}")
    return saved


def config_changes(saved: Config, cfg: Config) -> list[str]:
    """'field old -> new' for each value this run sets otherwise than the checkpoint's config
    (train.out_dir aside: a moved run directory is the same run)."""
    old, new = dotted_fields(saved.to_dict()), dotted_fields(cfg.to_dict())
    return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
            if k != "train.out_dir" and old.get(k) != v]


def resume_points(where: str, root: Path) -> list[Path]:
    """The checkpoints `--resume where` names, in the order to try them -- 'auto': the complete
    ones under `root`, newest first (none: start fresh), so a damaged newest falls back to the
    one before; else the one path users typed (store.resolve)."""
    return store.complete_checkpoints(root)[::-1] if where == "auto" else [store.resolve(where)]
