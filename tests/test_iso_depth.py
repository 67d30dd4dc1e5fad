"""The iso-depth law (arXiv 2604.21106) in the sweeps: the fit recovers a known phi, the spec
expands an iso-depth grid, and a tiny CPU grid runs end to end."""

from __future__ import annotations

import numpy as np
import pytest

from pretrain.config import ConfigError
from pretrain.sweep.iso_depth import fit_iso_depth, phi_interval
from pretrain.sweep.spec import expand, load_spec
from tests.conftest import ROOT

TRUE = {"E": 1.8, "A": 300.0, "alpha": 0.34, "B": 900.0, "beta": 0.31, "phi": 0.46}


def _synthetic(noise: float, seed: int = 0):
    """An iso-depth grid as the paper's (depth 16 recurrent layers, prelude + coda 4 layers,
    r in {1, 2, 4, 8}), four widths x three token budgets, losses from the law with known
    constants times log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for per_layer in (2e5, 8e5, 3.2e6, 1.28e7):
        for r in (1, 2, 4, 8):
            for d in (3e8, 1.2e9, 4.8e9):
                once, rec = 4 * per_layer, 16 / r * per_layer
                eff = once + r ** TRUE["phi"] * rec
                loss = TRUE["E"] + TRUE["A"] * eff ** -TRUE["alpha"] + TRUE["B"] * d ** -TRUE["beta"]
                rows.append((once, rec, r, d, loss * np.exp(noise * rng.standard_normal())))
    return [np.array(c) for c in zip(*rows, strict=True)]


def test_fit_recovers_phi_within_its_bootstrap_interval():
    """48 points with 0.5% noise: the fitted phi lies near the true 0.46, and the 95% bootstrap
    interval holds the true value and is narrow enough to tell 0.46 from 0.35 (the paper's
    truncated-backprop value) -- a fit that ignored r could not pass."""
    cols = _synthetic(0.005)
    fit = fit_iso_depth(*cols)
    lo, hi = phi_interval(*cols, fit, iters=60)
    assert lo <= TRUE["phi"] <= hi, (fit.phi, lo, hi)
    assert abs(fit.phi - TRUE["phi"]) < 0.05 and hi - lo < 0.11 and lo > 0.35
    exact = fit_iso_depth(*_synthetic(0.0))  # noise-free: the constants themselves
    assert exact.phi == pytest.approx(TRUE["phi"], abs=2e-3)
    assert exact.alpha == pytest.approx(TRUE["alpha"], abs=5e-3)


def test_spec_expands_an_iso_depth_grid_and_refuses_a_bad_one(tmp_path):
    spec = load_spec(ROOT / "configs/sweeps/iso-depth-cpu.yaml")
    points = expand(spec)
    assert len(points) == 2 * 2 * 3 and spec.law == "iso-depth"
    for pt in points:
        m = pt.cfg.model
        assert m.num_layers * m.loops == 4 and m.loop_mode == "huginn"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {ROOT / 'configs/huginn-cpu.yaml'}\nout_dir: {tmp_path}\n"
                   "iso_depth: {depth: 4, loops: [3]}\n")
    with pytest.raises(ConfigError, match="loop count 3 does not divide depth 4"):
        load_spec(bad)
