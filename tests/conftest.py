from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(*overrides: str, out_dir: str | Path = "runs/test"):
    """configs/tiny.yaml with overrides; paths resolved from the repo root."""
    return load_config(ROOT / "configs/tiny.yaml",
                       [f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={out_dir}",
                        *overrides])


VARIANTS = {
    "plain": [],
    "fully_looped": ["model.fully_looped=true", "model.attention_injection=true"],
    "huginn": ["model.prelude_layers=1", "model.coda_layers=1", "model.tie_embeddings=true",
               "model.sandwich_norm=false"],
}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)
