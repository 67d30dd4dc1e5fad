"""Pretraining of looped language models: model, objective, trainer, checkpoints and CLI."""

__version__ = "0.1.0"
