"""Single-process model checkpoints: `step_XXXXXXX/` with model.pt and config.yaml.

Written to a `.tmp` directory and renamed, so a crash never leaves a half checkpoint under the
final name; loaded with `weights_only=True`. (Sharded, resumable checkpoints build on this.)
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from pretrain.config import Config, ConfigError, dump_config, load_config
from pretrain.model.looped import LoopedLM


def save_model(root: str | Path, step: int, state: dict[str, torch.Tensor], cfg: Config) -> Path:
    """Write the full (TP=1) model state of `step`."""
    final = Path(root) / f"step_{step:07d}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "model.pt")
    (tmp / "config.yaml").write_text(dump_config(cfg))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def load_model(path: str | Path, overrides: list[str] = ()) -> tuple[Config, LoopedLM]:
    """Rebuild the model of a checkpoint directory; `overrides` may change e.g. model.loops."""
    d = Path(path)
    if not (d / "model.pt").is_file():
        raise ConfigError(f"{d}: not a checkpoint directory (no model.pt)")
    cfg = load_config(d / "config.yaml", overrides)
    model = LoopedLM(cfg.model)
    model.load_state_dict(torch.load(d / "model.pt", map_location="cpu", weights_only=True))
    return cfg, model
