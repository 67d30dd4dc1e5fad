"""Gather each sweep point's result into one CSV: size, tokens, FLOPs, losses."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from pretrain.checkpoint import store
from pretrain.config import ConfigError

COLUMNS = ["point", "hidden_size", "num_layers", "loops", "lr", "params", "non_embedding_params",
           "once_params", "recurrent_params", "backprop_loops", "loops_sampler",
           "residual_scale", "tokens", "flops", "steps", "train_loss", "eval_loss",
           "eval_ce_final", "eval_data", "run_dir"]
TEXT_COLUMNS = ("run_dir", "eval_data", "loops_sampler")
LATER_COLUMNS = {"residual_scale": "0"}  # added since: an older results.csv reads as this


def collect(sweep_dir: Path, log=print, allow_commands: bool = False) -> Path:
    """Evaluate every finished point's last checkpoint on eval_batches micro-batches of its
    validation data (evaluate.py `heldout_batches`: "validation", or said plainly "training"
    when a point has none); points without a checkpoint are listed as missing. A point's
    `pipe:` data commands run only with `allow_commands` (the sweep directory may come from
    anyone; `sweep --local` allows its own)."""
    from pretrain.checkpoint.offline import load_model, refuse_shell_commands
    from pretrain.evaluate import evaluate
    from pretrain.model.flops import count_parameters, run_flops_per_token
    from pretrain.run.status import last_metrics

    indices, eval_batches = read_index(sweep_dir)
    rows, missing = [], []
    for index in indices:
        run_dir = sweep_dir / "points" / str(index)
        ckpt = store.newest(run_dir / "checkpoints")
        if ckpt is None:
            missing.append(index)
            continue
        if not allow_commands:
            refuse_shell_commands(ckpt, "sweep collect", "pass --allow-commands to run it")
        cfg, model = load_model(ckpt)
        meta = store.read_meta(ckpt)
        ev = evaluate(cfg, model, eval_batches)
        params = count_parameters(cfg.model)
        metrics = last_metrics(run_dir) or {}
        rows.append({"point": index, "hidden_size": cfg.model.hidden_size,
                     "num_layers": cfg.model.num_layers, "loops": cfg.model.loops,
                     "lr": cfg.optim.lr, "params": params["total"],
                     "non_embedding_params": params["non_embedding"],
                     "once_params": params["once"], "recurrent_params": params["recurrent"],
                     "backprop_loops": cfg.recurrence.backprop,
                     "loops_sampler": cfg.recurrence.sampler,
                     "residual_scale": cfg.model.residual_scale, "tokens": meta["tokens"],
                     "flops": run_flops_per_token(cfg) * meta["tokens"],
                     "steps": meta["step"], "train_loss": metrics.get("train/loss", float("nan")),
                     "eval_loss": ev["loss"], "eval_ce_final": ev["ce_final"],
                     "eval_data": "validation" if ev["validation"] else "training",
                     "run_dir": str(run_dir)})
    which = {r["eval_data"] for r in rows}
    log(f"sweep collect: eval_loss measured on {' and '.join(sorted(which)) or 'nothing'} data"
        + ("" if which <= {"validation"} else " -- set data.validation for held-out numbers"))
    if missing:
        log(f"sweep collect: {len(missing)} point(s) without a checkpoint: {missing}")
    out = sweep_dir / "results.csv"
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    log(f"sweep collect: {len(rows)} point(s) -> {out}")
    return out


POINTS_INDEX = "points.json"


def read_index(sweep_dir: Path) -> tuple[list[int], int]:
    """points.json's point indices and eval_batches. Each point's run is read from
    `sweep_dir/points/<index>` (where `write_points` put it), never from a path the index
    names: a sweep directory may be moved, or come from anyone."""
    index = sweep_dir / POINTS_INDEX
    if not index.is_file():
        raise ConfigError(f"{index}: not a sweep directory (run `pretrain sweep --spec ...`)")
    try:
        sweep = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ConfigError(f"{index}: unreadable ({e})") from None
    points = sweep.get("points") if isinstance(sweep, dict) else None
    indices = [p.get("index") for p in points or () if isinstance(p, dict)]
    if (not isinstance(points, list) or len(indices) != len(points)
            or not all(type(i) is int and i >= 0 for i in indices)):
        raise ConfigError(f"{index}: expected {{\"points\": [{{\"index\": N, ...}}, ...]}}")
    batches = sweep.get("eval_batches", 8)
    if type(batches) is not int or batches < 1:
        raise ConfigError(f"{index}: eval_batches: expected an integer >= 1, got "
                          f"{str(batches)[:40]!r}")
    return indices, batches


MAY_BE_NAN = ("train_loss",)  # a point without a metrics log


def read_results(path: Path) -> list[dict]:
    """results.csv's rows, each number finite (a fit of a NaN prints a law from its start
    values): one line naming the row and column otherwise."""
    try:
        with open(path, newline="") as fh:
            raw = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{path}: unreadable as CSV ({e})") from None
    rows = []
    for i, row in enumerate(raw, start=2):  # line 1 is the header
        for column, value in LATER_COLUMNS.items():
            if column not in row:
                row[column] = value
        missing = [c for c in COLUMNS if row.get(c) in (None, "")]
        if missing:
            raise ConfigError(f"{path}: line {i}: no value for {missing[0]}")
        out = {}
        for k in COLUMNS:
            if k in TEXT_COLUMNS:
                out[k] = row[k]
                continue
            try:
                out[k] = float(row[k])
            except ValueError:
                raise ConfigError(f"{path}: line {i}: {k} is {row[k]!r}, not a number") from None
            if not math.isfinite(out[k]) and k not in MAY_BE_NAN:
                raise ConfigError(f"{path}: line {i}: {k} is {row[k]} (point "
                                  f"{row['point']}); remove the row or collect it again")
        rows.append(out)
    return rows
