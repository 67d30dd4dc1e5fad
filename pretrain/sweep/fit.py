"""Scaling-law fits of a sweep: L(N, D) = E + A/N^alpha + B/D^beta (Chinchilla approach 3) and
a loop-count law L(R) = L_inf + C/R^gamma at fixed N and D, with compute-optimal N, D.

Approach 3 as in Hoffmann et al. (2022): minimise the Huber loss (delta 1e-3) between
log L_pred and log L_obs, with log L_pred = LSE(a - alpha log N, b - beta log D, e) (A = e^a,
B = e^b, E = e^e) by L-BFGS from a grid of starting points, keeping the best.

Compute: C = k N D FLOPs, where k (FLOPs per parameter per token) is measured from the points
(`pretrain params`' flops_per_token: about 6 R for a looped model, not 6). Minimising L along
C = k N D gives N_opt = G (C/k)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)).
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

HUBER_DELTA = 1e-3


@dataclass
class LawFit:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    objective: float
    points: int

    def predict(self, n, d):
        return self.E + self.A / np.asarray(n, float) ** self.alpha \
            + self.B / np.asarray(d, float) ** self.beta

    def optimal(self, flops: float, k: float) -> tuple[float, float]:
        """Compute-optimal (N, D) for a budget of `flops` with C = k N D."""
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
        n = g * (flops / k) ** (self.beta / (self.alpha + self.beta))
        return n, flops / (k * n)


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r ** 2, delta * (a - 0.5 * delta))


def fit_law(n, d, loss, delta: float = HUBER_DELTA) -> LawFit:
    from scipy.optimize import minimize
    from scipy.special import logsumexp

    log_n, log_d = np.log(np.asarray(n, float)), np.log(np.asarray(d, float))
    log_l = np.log(np.asarray(loss, float))

    def objective(x):  # Huber loss of the log-space residuals and its gradient
        a, b, e, alpha, beta = x
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        pred = logsumexp(terms, axis=0)
        w = np.exp(terms - pred)  # softmax: d pred / d (a, b, e)
        r = pred - log_l
        g = np.clip(r, -delta, delta)  # Huber'
        grad = np.array([(g * w[0]).sum(), (g * w[1]).sum(), (g * w[2]).sum(),
                         -(g * w[0] * log_n).sum(), -(g * w[1] * log_d).sum()])
        return huber(r, delta).sum(), grad

    best = None
    for a, b, e, alpha, beta in itertools.product((0, 5, 10, 20), (0, 5, 10, 20), (-1, 0, 1),
                                                  (0.25, 0.5, 1.0), (0.25, 0.5, 1.0)):
        res = minimize(objective, np.array([a, b, e, alpha, beta], float), jac=True,
                       method="L-BFGS-B",
                       bounds=[(-10, 60), (-10, 60), (-5, 5), (0, 3), (0, 3)])
        if best is None or res.fun < best.fun:
            best = res
    a, b, e, alpha, beta = best.x
    return LawFit(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), B=float(np.exp(b)),
                  beta=float(beta), objective=float(best.fun), points=len(log_l))


def fit_loops(loops, loss) -> dict | None:
    """L(R) = L_inf + C R^-gamma over one (N, D) group; None with fewer than 3 loop counts."""
    from scipy.optimize import curve_fit

    r, y = np.asarray(loops, float), np.asarray(loss, float)
    if len(set(r)) < 3:
        return None
    try:
        with warnings.catch_warnings():  # 3 points, 3 constants: no covariance, by design
            warnings.simplefilter("ignore")
            (l_inf, c, gamma), _ = curve_fit(lambda x, li, c, g: li + c * x ** -g, r, y,
                                             p0=(y.min() * 0.9, y.max() - y.min() + 1e-3, 1.0),
                                             bounds=([0, 0, 0], [np.inf, np.inf, 10]),
                                             maxfev=20000)
    except RuntimeError:
        return None
    return {"L_inf": float(l_inf), "C": float(c), "gamma": float(gamma)}


def loop_law_text(f: dict | None) -> str:
    """A `fit_loops` result as the report says it; a fit whose R term vanishes is no law."""
    if not f:
        return "fewer than 3 loop counts: no fit"
    if f["C"] * f["gamma"] < 1e-6:
        return "no trend in R: the fitted C / R^gamma term vanishes"
    return f"L(R) = {f['L_inf']:.4g} + {f['C']:.4g} / R^{f['gamma']:.3g}"


def _plots(rows: list[dict], law: LawFit | None, k: float, loop_groups: dict,
           out: Path) -> list[Path]:
    """fit_vs_points.png and isoflop.png (with a law), loops.png (with loop groups)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = [] if law is None else _law_plots(rows, law, k, out, plt)
    if loop_groups:
        fig, ax = plt.subplots(figsize=(5, 4))
        for (gn, gd), (rs, ls, fit) in loop_groups.items():
            (dots,) = ax.plot(rs, ls, "o", label=f"N={gn:.3g} D={gd:.3g}")
            if fit:  # the fitted line in its points' colour
                grid_r = np.linspace(min(rs), max(rs), 50)
                ax.plot(grid_r, fit["L_inf"] + fit["C"] * grid_r ** -fit["gamma"], "-",
                        color=dots.get_color())
        ax.set(xlabel="loops R", ylabel="eval loss", title="loop-count law")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out / "loops.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _law_plots(rows: list[dict], law: LawFit, k: float, out: Path, plt) -> list[Path]:
    import matplotlib.ticker

    paths = []
    n = np.array([r["params"] for r in rows])
    d = np.array([r["tokens"] for r in rows])
    y = np.array([r["eval_loss"] for r in rows])
    c = np.array([r["flops"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 4))
    pred = law.predict(n, d)
    ax.scatter(pred, y)
    lo, hi = min(pred.min(), y.min()), max(pred.max(), y.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="fitted L(N, D)", ylabel="eval loss", title="fit vs points")
    paths.append(_save(fig, out / "fit_vs_points.png", plt))

    fig, ax = plt.subplots(figsize=(5, 4))
    grid = np.logspace(np.log10(n.min() / 3), np.log10(n.max() * 3), 100)
    for budget in np.logspace(np.log10(c.min()), np.log10(c.max()), 4):
        ax.plot(grid, law.predict(grid, budget / (k * grid)), label=f"C={budget:.2g}")
        n_opt, _ = law.optimal(budget, k)
        ax.plot(n_opt, law.predict(n_opt, budget / (k * n_opt)), "k*")
    sc = ax.scatter(n, y, c=np.log10(c), cmap="viridis", zorder=3)
    fig.colorbar(sc, label="log10 FLOPs")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="isoFLOP curves (* optimum)")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # a narrow N range: clutter
    ax.legend(fontsize=7)
    paths.append(_save(fig, out / "isoflop.png", plt))
    return paths


# results.csv columns a sweep may vary, shown when no law fits
VARIED = ("hidden_size", "num_layers", "loops", "residual_scale", "lr", "params", "tokens")


def _no_law(rows: list[dict], csv_path: Path, why: str) -> str:
    """The report when no L(N, D) law can be fitted: why, then each point's varied values and
    eval loss, best first within each group of the other varied values (lr last: the best lr
    of each group)."""
    varied = [c for c in VARIED if len({r[c] for r in rows}) > 1]
    lines = [f"no L(N, D) law: {why}. The points ({csv_path}):"]
    key = [c for c in varied if c != "lr"]
    for r in sorted(rows, key=lambda r: (*(r[c] for c in key), r["eval_loss"])):
        values = ", ".join(f"{c}={r[c]:g}" for c in varied)
        lines.append(f"  {values}: eval loss {r['eval_loss']:.4f}")
    return "\n".join(lines)


def fit_sweep(sweep_dir: Path, budget: float | None = None) -> str:
    """Fit the collected results (results.csv), save fit.json and the PNGs, return a report."""
    from pretrain.config import ConfigError
    from pretrain.sweep.collect import read_results

    csv_path = sweep_dir / "results.csv"
    if not csv_path.is_file():
        raise ConfigError(f"{csv_path}: missing (run `pretrain sweep collect {sweep_dir}` first)")
    rows = read_results(csv_path)
    if len(rows) < 2:
        raise ConfigError(f"{csv_path}: {len(rows)} point(s); a fit needs at least 2")
    common_r = Counter(r["loops"] for r in rows).most_common(1)[0][0]
    at_r = [r for r in rows if r["loops"] == common_r]
    groups: dict = defaultdict(lambda: ([], []))
    for r in rows:
        groups[(r["params"], r["tokens"])][0].append(r["loops"])
        groups[(r["params"], r["tokens"])][1].append(r["eval_loss"])
    loop_groups = {key: (rs, ls, fit_loops(rs, ls)) for key, (rs, ls) in groups.items()
                   if len(set(rs)) > 1}
    loop_lines = [f"loops at N={gn:.4g}, D={gd:.4g}: "
                  + ", ".join(f"R={r:g}: {v:.4f}" for r, v in sorted(zip(rs, ls, strict=True)))
                  + f"; {loop_law_text(f)}" for (gn, gd), (rs, ls, f) in loop_groups.items()]
    sizes, budgets = {r["params"] for r in at_r}, {r["tokens"] for r in at_r}
    loop_laws = [{"params": gn, "tokens": gd, "loops": rs, "loss": ls, "fit": f}
                 for (gn, gd), (rs, ls, f) in loop_groups.items()]
    if len(sizes) < 2 or len(budgets) < 2:
        (sweep_dir / "fit.json").write_text(json.dumps({"law": None, "loop_laws": loop_laws},
                                                       indent=1))
        plots = _plots(rows, None, 0.0, loop_groups, sweep_dir)
        return "\n".join([_no_law(rows, csv_path, f"the points at R={common_r:g} hold "
                                                 f"{len(sizes)} model size(s) and {len(budgets)} "
                                                 "token budget(s); L(N, D) needs 2 or more of "
                                                 "each"), *loop_lines,
                          *([f"plots: {', '.join(map(str, plots))}"] if plots else [])])
    law = fit_law([r["params"] for r in at_r], [r["tokens"] for r in at_r],
                  [r["eval_loss"] for r in at_r])
    k = float(np.mean([r["flops"] / (r["params"] * r["tokens"]) for r in at_r]))
    budget = budget or max(r["flops"] for r in rows) * 10
    n_opt, d_opt = law.optimal(budget, k)
    report = {"law": asdict(law), "loops_for_law": common_r, "flops_per_param_token": k,
              "budget": budget, "optimal_params": n_opt, "optimal_tokens": d_opt,
              "loop_laws": loop_laws}
    (sweep_dir / "fit.json").write_text(json.dumps(report, indent=1))
    plots = _plots(at_r, law, k, loop_groups, sweep_dir)
    lines = [f"L(N, D) = {law.E:.4g} + {law.A:.4g} / N^{law.alpha:.4g} + {law.B:.4g} / D^{law.beta:.4g}"
             f"   ({law.points} points at R={common_r:g}; Huber objective {law.objective:.3g})"]
    if law.points < 5:
        lines.append(f"warning: {law.points} points for 5 constants: the fit is not identifiable")
    lines.append(f"compute: C = {k:.3g} N D FLOPs; for C = {budget:.3g}: N_opt = {n_opt:.4g} "
                 f"parameters, D_opt = {d_opt:.4g} tokens")
    lines += loop_lines
    lines.append("plots: " + ", ".join(str(p) for p in plots) + f"; constants: {sweep_dir / 'fit.json'}")
    return "\n".join(lines)
