"""Which config changes a checkpoint survives."""

from __future__ import annotations

from pretrain.config import Config

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
