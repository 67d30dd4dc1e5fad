"""One downstream evaluation: every (loop count, exit rule) setting over the same loaded tasks.

lm-eval's `evaluate` runs once per setting on the tasks `load_tasks` built (no data is read
again), with the harness wrapper switched to the setting; loglikelihood requests are scored
once for all settings (harness_lm.py). Each setting's result is lm-eval's own result JSON with
a "looped" section: loops, exit rule, KV cache policy, and mean loops used per task.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.downstream.harness_lm import LoopedHarnessLM
from pretrain.downstream.tasks import LoadedTasks, import_lm_eval
from pretrain.model.generate import ExitRule
from pretrain.text import TextCodec

NOT_METRICS = ("alias", "name", "sample_len")


@dataclass(frozen=True)
class Setting:
    loops: int
    rule: ExitRule

    @property
    def name(self) -> str:
        """loops4, loops8_gate:0.5 (the metric names' suffix)."""
        return f"loops{self.loops}" + ("" if self.rule.kind == "all" else f"_{self.rule}")


def settings_of(loops: list[int], rules: list[ExitRule]) -> list[Setting]:
    return [Setting(r, rule) for rule in rules for r in loops]


def evaluate_settings(lm: LoopedHarnessLM, tasks: LoadedTasks, settings: list[Setting],
                      limit: int | None = None, bootstrap_iters: int = 100000) -> dict:
    """{setting: lm-eval result dict + "looped"}."""
    lm_eval = import_lm_eval()
    out = {}
    for s in settings:
        lm.use(s.loops, s.rule)
        res = lm_eval.evaluator.evaluate(lm=lm, task_dict=tasks.task_dict, limit=limit,
                                         bootstrap_iters=bootstrap_iters, log_samples=False,
                                         verbosity="WARNING")
        steps, tokens = (sum(t[i] for t in lm.loops_used.values()) for i in (0, 1))
        res["looped"] = {"loops": s.loops, "exit": str(s.rule), "kv_cache": lm.kv_cache,
                         "mean_loops": {k: v[0] / v[1] for k, v in lm.loops_used.items() if v[1]},
                         "mean_loops_all": steps / tokens if tokens else float(s.loops)}
        out[s] = res
    return out


def primary_metric(result: dict, task: str) -> tuple[str, float]:
    """A task's headline number: the first metric lm-eval reports for it (acc for multiple
    choice, exact_match for generation), as "metric,filter" and its value."""
    for key, value in result["results"][task].items():
        if key not in NOT_METRICS and "_stderr" not in key and isinstance(value, (int, float)):
            return key, float(value)
    raise KeyError(f"{task}: no metric in the results")


def headline(results: dict) -> dict[Setting, dict[str, float]]:
    """{setting: {task: primary metric}} over every task and group reported."""
    return {s: {task: primary_metric(res, task)[1] for task in res["results"]}
            for s, res in results.items()}


def evaluate_model(cfg, model, tasks: LoadedTasks, loops: list[int], rules: list[ExitRule],
                   kv_cache: str = "full", batch_size: int = 8, limit: int | None = None,
                   bootstrap_iters: int = 100000) -> dict:
    """Every setting of `loops` x `rules` for a full model (`model.cfg.loops` >= max(loops))."""
    lm = LoopedHarnessLM(model, TextCodec.of(cfg.data.tokenizer), max(loops), batch_size, kv_cache)
    return evaluate_settings(lm, tasks, settings_of(loops, rules), limit, bootstrap_iters)
