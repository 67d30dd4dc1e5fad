"""The looped LM, its objectives, generation and FLOP accounting (no process-group logic)."""

from pretrain.model.looped import LoopedLM, LoopedOutput
from pretrain.model.objective import compute_objective

__all__ = ["LoopedLM", "LoopedOutput", "compute_objective"]
