"""Sweeps: spec expansion and its errors, a local run, and the scaling-law fit on points from
a known law."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.sweep.fit import fit_law
from pretrain.sweep.spec import expand, load_spec, write_points
from tests.conftest import ROOT

CHINCHILLA = {"E": 1.69, "A": 406.4, "alpha": 0.34, "B": 410.7, "beta": 0.28}


def test_fit_recovers_a_known_law_and_its_compute_optimum():
    rng = np.random.default_rng(0)
    n = np.repeat(np.logspace(6, 9, 6), 6)
    d = np.tile(np.logspace(8, 11, 6), 6)
    c = CHINCHILLA
    loss = (c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]) \
        * np.exp(rng.normal(0, 1e-3, n.shape))
    fit = fit_law(n, d, loss)
    for name, want in c.items():
        assert getattr(fit, name) == pytest.approx(want, rel=0.05), name
    budget, k = 1e21, 6.0
    n_opt, d_opt = fit.optimal(budget, k)
    assert n_opt * d_opt * k == pytest.approx(budget)
    along = minimize_scalar(lambda logn: fit.predict(np.exp(logn), budget / (k * np.exp(logn))),
                            bounds=(np.log(1e6), np.log(1e13)), method="bounded")
    assert n_opt == pytest.approx(np.exp(along.x), rel=1e-3)


def _spec(tmp_path, body: str):
    path = tmp_path / "spec.yaml"
    path.write_text(f"base: {ROOT / 'configs/tiny.yaml'}\nout_dir: {tmp_path / 'sweep'}\n" + body)
    return path


def test_a_bad_point_is_named_before_anything_runs(tmp_path):
    spec = load_spec(_spec(tmp_path, "grid: {model.hidden_size: [64, 30]}\n"))
    with pytest.raises(ConfigError, match=r"point 1 \{'model.hidden_size': 30\}: model.num_heads"):
        expand(spec)
    with pytest.raises(ConfigError, match="unknown key"):
        load_spec(_spec(tmp_path, "grdi: {}\n"))


def test_local_sweep_trains_collects_and_fits(tmp_path, capsys):
    spec = _spec(tmp_path, f"overrides: [train.max_steps=12, train.log_every=6, "
                           f"optim.warmup_steps=2, 'data.paths=[{ROOT / 'data/sample.txt'}]']\n"
                           "list: [{model.loops: 1}, {model.loops: 2}, {}]\neval_batches: 2\n")
    assert main(["sweep", "--spec", str(spec), "--local"]) == 0
    out = capsys.readouterr().out
    assert f"sweep: [1/3] point 0: model.loops=1 (log: {tmp_path / 'sweep/points/0/train.log'})" in out
    assert re.search(r"^sweep: \[3/3\] point 2 done in \d+ s, train loss \d\.\d{4}$", out, re.M)
    assert re.search(r"^sweep: \[1/3\] point 0 done in \d+ s, train loss [\d.]+; about [\d.]+ "
                     r"min left$", out, re.M)
    with open(tmp_path / "sweep/results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["loops"]) for r in rows] == [1, 2, 3]
    assert all(float(r["tokens"]) == 12 * 16 * 64 and float(r["eval_loss"]) > 0 for r in rows)
    # one size and budget: no L(N, D) law (tested below on a written results.csv), the loop law
    assert "no L(N, D) law" in out and "loops at N=" in out
    assert (tmp_path / "sweep/loops.png").stat().st_size > 1000
    assert main(["status", str(tmp_path / "sweep")]) == 0
    status = capsys.readouterr().out.splitlines()
    assert status[0] == f"sweep: {tmp_path / 'sweep'}: 3 of 3 points finished"
    assert status[1].startswith("  point 0: finished (step 12 of 12), train loss ")
    assert status[3].startswith("  point 2: finished (step 12 of 12), train loss ")
    _a_changed_spec_does_not_resume_old_points(tmp_path, spec, capsys)


def _a_changed_spec_does_not_resume_old_points(tmp_path, spec, capsys):
    """Issue 25 item 4: a re-run with the same spec skips the finished points; a changed spec
    would resume another config's checkpoints as its own -- refused (nothing touched), or
    moved aside with --overwrite."""
    points = tmp_path / "sweep/points"
    before = {p: p.read_bytes() for p in points.rglob("*") if p.is_file() and "checkpoints" in p.parts}
    assert main(["sweep", "--spec", str(spec), "--local"]) == 0
    capsys.readouterr()
    spec.write_text(spec.read_text().replace("max_steps=12", "max_steps=13"))
    assert main(["sweep", "--spec", str(spec), "--local"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "point 0" in err and "holds checkpoints of a different" in err
    assert {p: p.read_bytes() for p in before} == before
    s = load_spec(spec)
    write_points(s, expand(s), overwrite=True)
    aside = [p for p in points.iterdir() if p.name.startswith("0.old-")]
    assert len(aside) == 1 and not (points / "0/checkpoints").exists()
    moved = {p: (aside[0] / p.relative_to(points / "0")).read_bytes() for p in before
             if p.is_relative_to(points / "0")}
    assert moved and all(before[p] == b for p, b in moved.items())


def _results(path, rows):
    from pretrain.sweep.collect import COLUMNS

    base = {c: 1 for c in COLUMNS} | {"loops_sampler": "fixed", "eval_data": "validation",
                                      "run_dir": "x", "residual_scale": 0}
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in COLUMNS if c in {**base, **rows[0]}])
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**base, "point": i, **r})


def test_a_sweep_without_sizes_and_budgets_lists_its_points_instead_of_a_law(tmp_path):
    """An lr x R sweep (configs/sweeps/lr-transfer-cpu.yaml) has no L(N, D) to fit: one line
    says why, then every point best first within its group -- not a division by zero; an
    older results.csv without the residual_scale column reads it as 0."""
    from pretrain.sweep.fit import fit_sweep

    rows = [{"loops": r, "lr": lr, "eval_loss": loss}
            for r, lr, loss in ((2, 0.01, 2.5), (2, 0.03, 2.4), (6, 0.01, 2.2), (6, 0.03, 2.3))]
    _results(tmp_path / "results.csv", rows)
    assert fit_sweep(tmp_path).splitlines() == [
        "no L(N, D) law: the points at R=2 hold 1 model size(s) and 1 token budget(s); L(N, D) "
        f"needs 2 or more of each. The points ({tmp_path / 'results.csv'}):",
        "  loops=2, lr=0.03: eval loss 2.4000", "  loops=2, lr=0.01: eval loss 2.5000",
        "  loops=6, lr=0.01: eval loss 2.2000", "  loops=6, lr=0.03: eval loss 2.3000",
        "loops at N=1, D=1: R=2: 2.4000, R=2: 2.5000, R=6: 2.2000, R=6: 2.3000; fewer than 3 "
        "loop counts: no fit", f"plots: {tmp_path / 'loops.png'}"]
    assert json.loads((tmp_path / "fit.json").read_text())["law"] is None
    from pretrain.sweep.collect import COLUMNS, read_results

    with open(tmp_path / "old.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=[c for c in COLUMNS if c != "residual_scale"])
        w.writeheader()
        w.writerow({c: 1 for c in COLUMNS if c != "residual_scale"} | {"loops_sampler": "fixed"})
    assert read_results(tmp_path / "old.csv")[0]["residual_scale"] == 0.0


def test_a_flat_loss_over_r_is_no_law():
    """L(R) fitted to losses that do not move with R: C R^-gamma vanishes, and the report says
    there is no trend instead of printing L(R) = L + 1e-9 / R^1e-4."""
    from pretrain.sweep.fit import fit_loops, loop_law_text

    assert loop_law_text(fit_loops([1, 2, 4], [2.961, 2.961, 2.961])) == \
        "no trend in R: the fitted C / R^gamma term vanishes"
    assert loop_law_text(fit_loops([1, 2, 4], [3.0, 2.5, 2.25])).startswith("L(R) = ")


def test_a_sweep_over_sizes_and_budgets_fits_the_law_and_draws_it(tmp_path):
    """results.csv of 3 sizes x 3 budgets at R = 3 from the Chinchilla law (and R = 1, 2 at one
    of them): the fit report, fit.json and the three plots."""
    from pretrain.sweep.fit import fit_sweep

    c = CHINCHILLA
    rows = [{"loops": 3, "params": n, "tokens": d, "flops": 6 * n * d,
             "eval_loss": c["E"] + c["A"] / n ** c["alpha"] + c["B"] / d ** c["beta"]}
            for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9, 1e10)]
    rows += [{**rows[0], "loops": r, "eval_loss": rows[0]["eval_loss"] + 0.1 / r} for r in (1, 2)]
    _results(tmp_path / "results.csv", rows)
    report = fit_sweep(tmp_path)
    assert report.startswith("L(N, D) = ") and "(9 points at R=3;" in report
    assert "loops at N=1e+06, D=1e+08: R=1: " in report
    assert json.loads((tmp_path / "fit.json").read_text())["law"]["alpha"] > 0
    for png in ("fit_vs_points.png", "isoflop.png", "loops.png"):
        assert (tmp_path / png).stat().st_size > 1000

