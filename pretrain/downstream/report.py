"""What a downstream evaluation leaves behind, beside each other in one directory:

  results_<setting>.json  lm-eval's result JSON of each (loops, exit rule) setting, plus its
                          "looped" section (harness wrapper's mean loops used per task)
  table.txt               task x loops, one block per exit rule: metric (mean loops)
  pareto.png / .json      the Ouro Fig. 5 view: mean accuracy over the tasks against mean
                          loops used per token, one curve per exit criterion (gate, delta,
                          fixed, all); the JSON holds the plotted points
"""

from __future__ import annotations

import json
from pathlib import Path

from pretrain.downstream.run import Setting, headline

CURVE_COLORS = {"gate": "tab:blue", "delta": "tab:orange", "fixed": "tab:green", "all": "tab:red"}


def table(results: dict) -> str:
    """Rows: exit rule x task; columns: loop counts; cells: metric (mean loops used)."""
    heads = headline(results)
    loops = sorted({s.loops for s in results})
    rules = list(dict.fromkeys(str(s.rule) for s in results))
    tasks = list(dict.fromkeys(t for h in heads.values() for t in h))
    width = max(len(t) for t in tasks) + 2
    lines = [f"{'exit':<10}{'task':<{width}}" + "".join(f"{'loops ' + str(r):>16}" for r in loops)]
    for rule in rules:
        for task in tasks:
            cells = []
            for r in loops:
                s = next((s for s in results if s.loops == r and str(s.rule) == rule), None)
                if s is None or task not in heads[s]:
                    cells.append(f"{'-':>16}")
                    continue
                used = results[s]["looped"]["mean_loops"].get(task)
                cells.append(f"{heads[s][task]:>9.4f}" + (f" ({used:4.2f})" if used else " " * 7))
            lines.append(f"{rule:<10}{task:<{width}}" + "".join(cells))
    return "\n".join(lines)


def pareto_points(results: dict) -> dict[str, list[tuple[float, float, str]]]:
    """{criterion: [(mean loops used, mean metric over the tasks, setting), ...]} sorted by
    loops: one curve per exit criterion."""
    heads = headline(results)
    curves: dict[str, list] = {}
    for s, res in results.items():
        leaves = [t for t in res["looped"]["mean_loops"]] or list(heads[s])
        score = sum(heads[s][t] for t in leaves if t in heads[s]) / max(len(leaves), 1)
        curves.setdefault(s.rule.kind, []).append((res["looped"]["mean_loops_all"], score, s.name))
    return {k: sorted(v) for k, v in curves.items()}


def write_report(out_dir: Path, results: dict[Setting, dict]) -> Path:
    """Every file above; returns the directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    for s, res in results.items():
        (out_dir / f"results_{s.name.replace(':', '-')}.json").write_text(
            json.dumps(res, indent=2, default=str))
    (out_dir / "table.txt").write_text(table(results) + "\n")
    curves = pareto_points(results)
    (out_dir / "pareto.json").write_text(json.dumps(curves, indent=2))
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, pts in curves.items():
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=kind,
                color=CURVE_COLORS[kind])
    ax.set_xlabel("mean loops used per token")
    ax.set_ylabel("mean task metric")
    ax.set_title("accuracy against loops used, per exit criterion")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "pareto.png", dpi=100)
    plt.close(fig)
    return out_dir
