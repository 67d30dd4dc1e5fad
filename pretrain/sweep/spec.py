"""A sweep spec (YAML) and its expansion into one validated config per point.

    base: ../tiny.yaml            # run config, relative to the spec
    out_dir: runs/sweeps/tiny-cpu # points land in out_dir/points/<i>/
    overrides: [train.log_every=50]
    grid: {model.hidden_size: [32, 64], train.max_steps: [100, 200]}   # cartesian product
    list: [{model.loops: 1}, {model.loops: 2}]   # or / and explicit points (crossed with grid)
    iso_depth: {depth: 8, loops: [1, 2, 4, 8]}  # crossed too: model.num_layers = depth / r,
                                  # model.loops = r (the unrolled recurrent depth stays `depth`)
    law: iso-depth                # what `sweep --local` fits (default chinchilla; sweep fit --law)
    eval_batches: 8
    slurm: {time: "00:20:00", concurrent: 2, cpus_per_task: 1, partition: "", account: ""}

Every point's config is validated before anything runs or is submitted, so a typo costs one
line, not a queued job array.
"""

from __future__ import annotations

import itertools
import json
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from core.config_schema import KIND_NAMES, is_kind, load_yaml
from pretrain.config import Config, ConfigError, absolute_paths, dump_config, load_config


@dataclass
class SweepSpec:
    path: Path
    base: Path
    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    points: list[dict] = field(default_factory=list)
    eval_batches: int = 8
    slurm: dict = field(default_factory=dict)
    iso_depth: list[dict] = field(default_factory=list)  # {num_layers, loops} per loop count
    law: str = "chinchilla"


@dataclass
class Point:
    index: int
    settings: dict  # what varies, e.g. {"model.hidden_size": 64, "model.loops": 2}
    run_dir: Path
    cfg: Config


def load_spec(path: str | Path) -> SweepSpec:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: sweep spec not found")
    try:
        tree = load_yaml(p.read_text(), str(p)) or {}
    except yaml.YAMLError:
        raise ConfigError(f"{p}: invalid YAML") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{p}: expected a mapping of keys (base, out_dir, grid, ...)")
    unknown = set(tree) - {"base", "out_dir", "overrides", "grid", "list", "eval_batches", "slurm",
                           "iso_depth", "law"}
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) {sorted(map(str, unknown))}")
    if "base" not in tree or "out_dir" not in tree:
        raise ConfigError(f"{p}: 'base' and 'out_dir' are required")
    for key, kind in (("base", str), ("out_dir", str), ("overrides", list), ("grid", dict),
                      ("list", list), ("eval_batches", int), ("slurm", dict), ("law", str)):
        value = tree.get(key)
        if (value is not None or key in ("base", "out_dir")) and not is_kind(value, kind):
            raise ConfigError(f"{p}: {key}: expected {KIND_NAMES[kind]}, got {reprlib.repr(value)}")
    if not all(isinstance(o, str) for o in tree.get("overrides") or ()):
        raise ConfigError(f"{p}: overrides: expected a list of `section.key=value` strings")
    eval_batches = 8 if tree.get("eval_batches") is None else tree["eval_batches"]
    if eval_batches < 1:
        raise ConfigError(f"{p}: eval_batches: must be >= 1")
    grid = tree.get("grid") or {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{p}: grid.{key}: must be a non-empty list")
    points = tree.get("list") or []
    if not all(isinstance(x, dict) for x in points):
        raise ConfigError(f"{p}: list: every point must be a mapping of dotted keys")
    law = tree.get("law", "chinchilla")
    if law not in ("chinchilla", "iso-depth"):
        raise ConfigError(f"{p}: law: {law!r}: expected chinchilla or iso-depth")
    return SweepSpec(path=p, base=(p.parent / tree["base"]).resolve(),
                     out_dir=Path(tree["out_dir"]).resolve(), overrides=list(tree.get("overrides") or []),
                     grid=grid, points=points, eval_batches=eval_batches,
                     slurm=dict(tree.get("slurm") or {}),
                     iso_depth=_iso_depth(p, tree.get("iso_depth")), law=law)


def _iso_depth(p: Path, tree) -> list[dict]:
    """iso_depth: {depth: D, loops: [r, ...]} -> one {num_layers: D / r, loops: r} per r."""
    if tree is None:
        return []
    if not isinstance(tree, dict) or set(tree) != {"depth", "loops"}:
        raise ConfigError(f"{p}: iso_depth: expected {{depth: D, loops: [r, ...]}}")
    depth, loops = tree["depth"], tree["loops"]
    if not isinstance(loops, list) or not loops:
        raise ConfigError(f"{p}: iso_depth.loops: must be a non-empty list")
    for r in loops:
        if not (isinstance(r, int) and isinstance(depth, int) and r >= 1 and depth % r == 0):
            raise ConfigError(f"{p}: iso_depth: loop count {r!r} does not divide depth {depth!r}")
    return [{"model.num_layers": depth // r, "model.loops": r} for r in loops]


def expand(spec: SweepSpec) -> list[Point]:
    """One validated config per point (grid x list), each with its own run directory."""
    keys = list(spec.grid)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*spec.grid.values())]
    settings = [{**c, **extra, **iso} for c in combos for extra in (spec.points or [{}])
                for iso in (spec.iso_depth or [{}])]
    out = []
    for i, s in enumerate(settings):
        run_dir = spec.out_dir / "points" / str(i)
        overrides = [*spec.overrides, *s.items(), ("train.out_dir", str(run_dir))]
        try:
            cfg = load_config(spec.base, overrides)
        except ConfigError as e:
            raise ConfigError(f"{spec.path}: point {i} {s}: {e}") from None
        absolute_paths(cfg)  # points run in their own directories
        out.append(Point(i, s, run_dir, cfg))
    worlds = {pt.cfg.parallel.world_size for pt in out}
    if len(worlds) > 1:
        raise ConfigError(f"{spec.path}: points need different process counts {sorted(worlds)}; "
                          "one job array runs one layout size")
    return out


def write_points(spec: SweepSpec, points: list[Point], overwrite: bool = False) -> Path:
    """Each point's config.yaml plus the sweep's index (points.json). A point whose run
    already holds checkpoints of a different config (the spec changed) would resume them as
    if they were its own: refused before anything is written, or with `overwrite` that run is
    moved aside."""
    from pretrain.checkpoint import store
    from pretrain.run.run_dir import move_aside

    changed = [pt for pt in points if store.newest(pt.run_dir / "checkpoints") is not None
               and (pt.run_dir / "config.yaml").is_file()
               and (pt.run_dir / "config.yaml").read_text() != dump_config(pt.cfg)]
    if changed and not overwrite:
        raise ConfigError(f"{spec.path}: point {changed[0].index} ({changed[0].run_dir}) holds "
                          "checkpoints of a different config (the spec changed); pass "
                          "--overwrite to move such points aside, or use a new out_dir")
    for pt in changed:
        print(f"sweep: point {pt.index}'s old run moved aside to {move_aside(pt.run_dir)}")
    for pt in points:
        pt.run_dir.mkdir(parents=True, exist_ok=True)
        (pt.run_dir / "config.yaml").write_text(dump_config(pt.cfg))
    index = spec.out_dir / "points.json"
    index.write_text(json.dumps({"spec": str(spec.path), "eval_batches": spec.eval_batches,
                                 "points": [{"index": pt.index, "settings": pt.settings,
                                             "run_dir": str(pt.run_dir)} for pt in points]},
                                indent=1))
    return index
