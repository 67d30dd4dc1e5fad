"""The looped LM, its objectives, generation and FLOP accounting (no process-group logic)."""
