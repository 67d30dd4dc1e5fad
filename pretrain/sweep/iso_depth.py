"""The iso-depth scaling law of looped LMs: what one recurrence is worth, as one number phi.

Schwethelm et al. 2026 (arXiv 2604.21106, "How Much Is One Recurrence Worth?"; code
kschwethelm/looped-lm-scaling): at a fixed unrolled depth, a model with N_once parameters run
once (prelude, coda) and N_rec parameters in a block looped r times follows

    L = E + A (N_once + r^phi N_rec)^(-alpha) + B D^(-beta)

phi = 1: a recurrence is worth a fresh layer's parameters; phi = 0: nothing. They measure
phi = 0.46 over a 116-run grid (r in {1, 2, 4, 8}), 0.35 with truncated backprop.

The fit is `fit.py`'s approach 3 with one more constant: Huber loss (delta 1e-3) on log L by
L-BFGS from a grid of starts, log L_pred = LSE(a - alpha log M, b - beta log D, e), M = N_once
+ r^phi N_rec. The interval of phi is a percentile bootstrap over the points (resampled with
replacement, each refit from the full fit), seeded, so a rerun prints the same interval.
N_once / N_rec come from the model's own parameter split (`pretrain params`: N_rec is the
looped block plus huginn's adapter, N_once the rest of the non-embedding parameters -- our
reading of the split; embeddings are left out as in our L(N, D)). A sweep whose points differ in
`recurrence.backprop` or `recurrence.sampler` is fitted per group, so Delta phi is read off.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pretrain.sweep.fit import HUBER_DELTA, LawFit, huber

BOOTSTRAP = 200  # resamples for the interval of phi
LEVEL = 0.95


@dataclass
class IsoDepthFit(LawFit):
    """The Chinchilla law (`LawFit`) of the effective parameters N_once + r^phi N_rec:
    `predict(effective(n_once, n_rec, r), d)`."""

    phi: float = 0.0

    def effective(self, n_once, n_rec, r):
        """Effective parameters N_once + r^phi N_rec."""
        return np.asarray(n_once, float) + np.asarray(r, float) ** self.phi * np.asarray(n_rec, float)


def _objective(x, log_once, n_rec, log_r, log_d, log_l, delta):
    """Huber loss of the log-space residuals and its gradient in (a, b, e, alpha, beta, phi)."""
    from scipy.special import logsumexp

    a, b, e, alpha, beta, phi = x
    rec = np.exp(phi * log_r) * n_rec
    m = np.exp(log_once) + rec
    log_m = np.log(m)
    terms = np.stack([a - alpha * log_m, b - beta * log_d, np.full_like(log_m, e)])
    pred = logsumexp(terms, axis=0)
    w = np.exp(terms - pred)
    r = pred - log_l
    g = np.clip(r, -delta, delta)
    grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                     -(g * w[0] * log_m).sum(), -(g * w[1] * log_d).sum(),
                     -(g * w[0] * alpha * rec * log_r / m).sum()])
    return huber(r, delta).sum(), grad


def fit_iso_depth(n_once, n_rec, r, d, loss, starts=None, delta: float = HUBER_DELTA) -> IsoDepthFit:
    """The law's constants by L-BFGS from each start (default: a grid), keeping the best."""
    from scipy.optimize import minimize

    data = (np.log(np.asarray(n_once, float)), np.asarray(n_rec, float),
            np.log(np.asarray(r, float)), np.log(np.asarray(d, float)),
            np.log(np.asarray(loss, float)), delta)
    if starts is None:
        starts = itertools.product((0, 10, 20), (0, 10, 20), (-1, 0, 1), (0.3, 0.6), (0.3, 0.6),
                                   (0.3, 0.7))
    best = None
    for x0 in starts:
        res = minimize(_objective, np.array(x0, float), args=data, jac=True, method="L-BFGS-B",
                       bounds=[(-10, 60), (-10, 60), (-5, 5), (0, 3), (0, 3), (0, 2)])
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta, phi = best.x
    return IsoDepthFit(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha),
                       B=float(np.exp(b)), beta=float(beta), phi=float(phi),
                       objective=float(best.fun), points=len(data[4]))


def phi_interval(n_once, n_rec, r, d, loss, fit: IsoDepthFit, iters: int = BOOTSTRAP,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval (LEVEL) of phi: points resampled with replacement, each
    resample refitted from the full fit's constants."""
    cols = [np.asarray(c, float) for c in (n_once, n_rec, r, d, loss)]
    x0 = (np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta, fit.phi)
    rng = np.random.default_rng(seed)
    phis = []
    for _ in range(iters):
        idx = rng.integers(0, len(cols[0]), len(cols[0]))
        if len(set(cols[2][idx])) < 2:  # one loop count: phi is not identified
            continue
        phis.append(fit_iso_depth(*(c[idx] for c in cols), starts=[x0]).phi)
    lo, hi = np.quantile(phis, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return float(lo), float(hi)


def _plot(groups: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for (name, (rows, fit, _)), marker in zip(groups.items(), "osd^v<>", strict=False):
        eff = fit.effective([x["once_params"] for x in rows], [x["recurrent_params"] for x in rows],
                            [x["loops"] for x in rows])
        ax.scatter(eff, [x["eval_loss"] for x in rows], marker=marker,
                   c=np.log2([x["loops"] for x in rows]), cmap="viridis",
                   label=f"{name}: phi={fit.phi:.2f}")
    ax.set(xscale="log", xlabel="effective parameters N_once + r^phi N_rec", ylabel="eval loss",
           title="iso-depth law (colour: log2 r)")
    ax.legend(fontsize=7)
    path = out / "iso_depth.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def fit_iso_depth_sweep(sweep_dir: Path) -> str:
    """Fit results.csv per (backprop_loops, loops_sampler) group; iso_depth.json, the plot and
    a report."""
    from pretrain.config import ConfigError
    from pretrain.sweep.collect import read_results

    csv_path = sweep_dir / "results.csv"
    if not csv_path.is_file():
        raise ConfigError(f"{csv_path}: missing (run `pretrain sweep collect {sweep_dir}` first)")
    by_group: dict = defaultdict(list)
    for row in read_results(csv_path):
        if "recurrent_params" not in row:
            raise ConfigError(f"{csv_path}: no recurrent_params column (collected by an older "
                              f"version: run `pretrain sweep collect {sweep_dir}` again)")
        by_group[f"backprop={row['backprop_loops']:g} sampler={row['loops_sampler']}"].append(row)
    groups, lines = {}, []
    for name, rows in by_group.items():
        if len({x["loops"] for x in rows}) < 2 or len(rows) < 6:
            lines.append(f"{name}: {len(rows)} point(s), {len({x['loops'] for x in rows})} loop "
                         "count(s): an iso-depth fit needs >= 2 loop counts and >= 6 points")
            continue
        cols = [[x[k] for x in rows] for k in
                ("once_params", "recurrent_params", "loops", "tokens", "eval_loss")]
        fit = fit_iso_depth(*cols)
        interval = phi_interval(*cols, fit)
        groups[name] = (rows, fit, interval)
        lines.append(f"{name}: L = {fit.E:.4g} + {fit.A:.4g} (N_once + r^{fit.phi:.3f} N_rec)"
                     f"^-{fit.alpha:.3g} + {fit.B:.4g} D^-{fit.beta:.3g}; phi = {fit.phi:.3f} "
                     f"[{interval[0]:.3f}, {interval[1]:.3f}] ({LEVEL:.0%} bootstrap, "
                     f"{fit.points} points)")
    if not groups:
        raise ConfigError(f"{csv_path}: no group can be fitted: " + "; ".join(lines))
    (sweep_dir / "iso_depth.json").write_text(json.dumps(
        {name: {**asdict(fit), "phi_interval": list(iv), "level": LEVEL}
         for name, (_, fit, iv) in groups.items()}, indent=1))
    lines.append(f"plot: {_plot(groups, sweep_dir)}; constants: {sweep_dir / 'iso_depth.json'}")
    return "\n".join(lines)
