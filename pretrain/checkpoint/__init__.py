"""Sharded, resumable, layout-free checkpoints (torch.distributed.checkpoint)."""

from pretrain.checkpoint.store import CheckpointError, resolve

__all__ = ["CheckpointError", "resolve"]
