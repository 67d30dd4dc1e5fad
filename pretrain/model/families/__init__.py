"""The loop families, one module each, registered by name (base.py says what a family is);
importing this package registers the built-in ones."""

from pretrain.model.families import flt, huginn, ouro, parcae  # noqa: F401  (registers them)
from pretrain.model.families.base import (
    LoopFamily,
    Widths,
    check_family,
    family_class,
    family_names,
    register,
)

__all__ = ["LoopFamily", "Widths", "check_family", "family_class", "family_names", "register"]
