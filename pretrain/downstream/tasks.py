"""lm-eval tasks, loaded once per run and before any model: names from lm-eval's registry
(hellaswag, arc_easy, mmlu, ... -- datasets from the Hugging Face hub on a cluster), or paths to
task YAML files (lm-eval's own format: a local JSON-lines file through `dataset_path: json`
works offline). A name lm-eval does not know, or a file that does not parse, is a ConfigError
with lm-eval's message on one line (the CLI exits 2 before it reads a checkpoint)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.config_schema import ConfigError

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed


@dataclass
class LoadedTasks:
    names: list[str]
    task_dict: dict  # TaskManager.load's {"tasks", "groups", "group_map"}


def import_lm_eval():
    """lm-eval itself, or a ConfigError saying how to install it."""
    try:
        import lm_eval.evaluator
    except ImportError:
        raise ConfigError("--tasks: lm-eval is not installed (pip install '.[eval]')") from None
    return lm_eval


def load_tasks(specs: list[str], num_fewshot: int | None = None, include_path: str = "",
               where: str = "--tasks") -> LoadedTasks:
    """Build the tasks (their documents are read here, once). `num_fewshot` overrides each
    task's default as lm-eval's simple_evaluate does (a task that fixes 0 keeps 0)."""
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    specs = [s.strip() for s in specs if s.strip()]
    if not specs:
        raise ConfigError(f"{where}: give at least one task name or task YAML file")
    registry_names = [s for s in specs if not Path(s).is_file()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    manager = TaskManager(include_path=include_path or None,
                          include_defaults=bool(registry_names))
    try:
        loaded = manager.load(specs)
    except Exception as e:  # lm-eval raises KeyError, yaml errors, datasets errors, ...
        text = " / ".join(line.strip() for line in str(e).strip("'\"").splitlines() if line.strip())
        raise ConfigError(f"{where}: {type(e).__name__}: {text}") from None
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return LoadedTasks(specs, loaded)
