"""Upcycling a checkpoint to a deeper shared block by layer duplication (how Ouro made its
2.6B model: the 24-layer 1.4B checkpoint grown to 48 layers; arXiv 2510.25741, Sec. 4).

  stack       new layer i = old layer i mod L: the block [l_0..l_{L-1}] repeated k times, so one
              application of the grown block is k applications of the old one (without the
              norm between loops); the default
  interleave  new layer i = old layer i div k: each layer repeated k times in place

The paper says "layer duplication" without the order; `stack` is our default because it keeps
the looped computation's order. Everything else (embedding, head, gate, norms, prelude/coda) is
copied. The result is a model-only, layout-free checkpoint at step 0 (fresh optimizer, data
from the start) that any TP x PP x DP layout resumes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pretrain.checkpoint.offline import load_model, save_full_model
from pretrain.config import ConfigError, validate
from pretrain.model.looped import LoopedLM

ORDERS = ("stack", "interleave")


def source_layer(i: int, old: int, new: int, order: str) -> int:
    """Which old layer new layer i copies."""
    return i % old if order == "stack" else i // (new // old)


def grow(where: str | Path, layers: int, out_root: str | Path, order: str = "stack",
         overrides: list[str] = ()) -> Path:
    cfg, model = load_model(where, list(overrides))
    old = cfg.model.num_layers
    if order not in ORDERS:
        raise ConfigError(f"--order: {order!r}: expected one of {', '.join(ORDERS)}")
    if layers <= old or layers % old:
        raise ConfigError(f"--layers: {layers} is not a multiple (> 1x) of the checkpoint's "
                          f"{old} shared layers (model.num_layers)")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, num_layers=layers))
    validate(cfg)
    grown = LoopedLM(cfg.model)
    state = model.state_dict()
    new_state = {}
    for name in grown.state_dict():
        if name.startswith("block."):
            _, i, rest = name.split(".", 2)
            name_old = f"block.{source_layer(int(i), old, layers, order)}.{rest}"
            new_state[name] = state[name_old]
        else:
            new_state[name] = state[name]
    grown.load_state_dict(new_state)
    return save_full_model(cfg, grown, Path(out_root))
