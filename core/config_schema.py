"""Typed configuration from YAML: one-line errors naming the field, type coercion, dotted
overrides, and inheritance (`base: other.yaml`: a file holds its differences from another).
Each config section (a dataclass) lives beside the code it protects and validates itself
there; this module only turns mappings into those dataclasses.
"""

from __future__ import annotations

import dataclasses
import difflib
import reprlib
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message names the offending field (the CLI prints it, exit 2)."""


# a JSON / YAML value's kind, as a one-line error names it
KIND_NAMES = {dict: "a mapping", int: "an integer", list: "a list", str: "a string"}


def is_kind(value: Any, kind: type) -> bool:
    """isinstance(value, kind), a bool being no int (a file's `true` is not 1)."""
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


MAX_YAML_VALUES = 100_000  # a config holds hundreds; aliases of aliases ("billion laughs") more
MAX_YAML_DEPTH = 64


def load_yaml(text: str, where: str) -> Any:
    """yaml.safe_load, bounded: a document that expands (aliases counted each time they are
    used) to more than MAX_YAML_VALUES values or nests deeper than MAX_YAML_DEPTH is one line,
    not a hang or a RecursionError. yaml.YAMLError passes through for the caller to place."""
    try:
        tree = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels") from None
    stack, count = [(tree, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"{where}: expands to over {MAX_YAML_VALUES:,} values (aliases "
                              "of aliases?); a config needs far fewer")
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_YAML_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children)
    return tree


def _coerce(value: Any, tp: Any, name: str, removed: dict[str, str] | None) -> Any:
    """Check `value` against the annotation `tp`; floats also accept ints and '3e-4' strings."""
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:  # built when raised: repr of a large value costs
        return ConfigError(f"{name}: expected {_type_name(tp)}, got {reprlib.repr(value)}")

    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {reprlib.repr(value)}")
        return build(tp, value, name, removed)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad()
        return [_coerce(v, typing.get_args(tp)[0], f"{name}[{i}]", removed) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad()
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad() from None
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {name}")


def build(cls: type, raw: dict[str, Any], prefix: str = "",
          removed: dict[str, str] | None = None) -> Any:
    """`cls` from the mapping `raw`, every field checked against its annotation; `removed`
    maps retired dotted fields to what replaced them (a false value, the old default, loads)."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            if removed and where in removed:
                if not raw[key]:
                    continue
                raise ConfigError(f"{where}: {removed[where]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key{hint}")
    kwargs = {}
    for name in names:
        if name in raw:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(raw[name], hints[name], full, removed)
    return cls(**kwargs)


# an override: `section.key=value` as a user types it, or (section.key, value) from the program
Override = str | tuple[str, Any]


def set_dotted(tree: dict[str, Any], override: Override) -> None:
    """Apply one override: `section.key=value` as typed (the value read as YAML), or a
    `(section.key, value)` pair built by the program, whose value is set as it is -- a path
    holding `#` or `: ` stays that path."""
    if isinstance(override, tuple):
        key, value = override
    else:
        if "=" not in override:
            raise ConfigError(f"override {override!r}: expected section.key=value")
        key, _, text = override.partition("=")
        try:
            value = load_yaml(text, key) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {text!r} ({e.__class__.__name__})") from None
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {key!r}: empty key component")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{p}' is not a section")
    node[parts[-1]] = value


def move_keys(tree: dict[str, Any], moved: dict[str, str]) -> list[tuple[str, str]]:
    """Move each dotted key of `moved` found in `tree` to its new dotted place, in place;
    the (old, new) pairs moved. Both given with different values is one line naming both."""
    done = []
    for old, new in moved.items():
        *path, leaf = old.split(".")
        node = tree
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *to, key = new.split(".")
        target = tree
        for p in to:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise ConfigError(f"{new}: '{p}' is not a section")
        if key in target and target[key] != value:
            raise ConfigError(f"{old}: is now {new}, which is also given (a different value)")
        target[key] = value
        done.append((old, new))
    return done


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`, section by section (a list or a value replaces the base's)."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if both else value
    return out


def _read_yaml(p: Path, chain: tuple[Path, ...] = (), bases: bool = True) -> dict[str, Any]:
    """The mapping in file `p`, with `base: other.yaml` (relative to `p`) resolved first: the
    file holds its differences from the base. Without `bases` (a file from elsewhere: it
    names no other file to read) a `base:` is refused."""
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        loaded = load_yaml(p.read_text(encoding="utf-8"), str(p))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        at = f" line {line + 1}" if line is not None else ""
        raise ConfigError(f"{p}{at}: invalid YAML") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    tree = loaded or {}
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not bases:
        raise ConfigError(f"{p}: base: refused (this file must be whole; it may name no other "
                          "file to read)")
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{p}: base: expected a YAML file name, got {base!r}")
    parent = (p.parent / base).resolve()
    if parent in chain or parent == p.resolve():
        raise ConfigError(f"{p}: base: {base} inherits from itself "
                          f"({' -> '.join(x.name for x in (*chain, p.resolve(), parent))})")
    if not parent.is_file():
        raise ConfigError(f"{p}: base: {base} not found (looked for {parent})")
    return merge(_read_yaml(parent, (*chain, p.resolve())), tree)


def load_tree(path: str | Path | None, overrides: Sequence[Override] = (),
              bases: bool = True) -> dict[str, Any]:
    """The YAML mapping at `path` (optional; its `base:` chain resolved, or refused without
    `bases`) with `a.b=value` overrides applied."""
    tree = _read_yaml(Path(path), bases=bases) if path is not None else {}
    for o in overrides:
        set_dotted(tree, o)
    return tree
