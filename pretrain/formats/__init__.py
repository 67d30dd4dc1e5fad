"""Release formats: a released checkpoint's tensor names and config.json, one module each
(ouro.py, huginn.py, parcae.py), named by the loop family that writes it
(`LoopFamily.release_format`); hf.py exports and imports through them."""

from __future__ import annotations

import reprlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module

from core.config_schema import ConfigError, is_kind


@dataclass(frozen=True)
class ReleaseFormat:
    """One release's format: our state -> their tensors, their config.json, their tensors ->
    our state, their config.json -> our overrides, whether a config.json is theirs, and the
    modeling files written beside an export (Huginn's and Parcae's are not ours to ship:
    README says how to load them)."""

    to_theirs: Callable
    config: Callable
    to_ours: Callable
    overrides: Callable
    reads: Callable[[dict], bool]
    files: tuple[str, ...] = ()


def family_format(family) -> ReleaseFormat:
    """The format a loop family class names (`LoopFamily.release_format`: a module holding
    `FORMAT`)."""
    return import_module(family.release_format).FORMAT


def config_int(hf: dict, name: str, least: int = 0, default: int | None = None) -> int:
    """A release config.json's integer field of at least `least` (`default` when absent, if
    given), or one line naming it."""
    value = hf.get(name, default)
    if not is_kind(value, int) or value < least:
        want = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise ConfigError(f"config.json: {name}: expected {want}, got {reprlib.repr(value)}")
    return value
