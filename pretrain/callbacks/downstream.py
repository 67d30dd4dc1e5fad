"""Downstream evaluation during training (`train.downstream`): every `every` steps and at the
end, the lm-eval tasks at each loop count and exit rule, logged to every output as
`downstream/<task>/loops{R}` (and `..._<rule>` plus `.../mean_loops` for early-exit rules).

It evaluates the step's checkpoint (writing one if the step has none), read back as the full
model on every rank -- the very path of `pretrain eval --checkpoint`, so the logged numbers
are that command's on that checkpoint, under any TP x PP x DP layout; the ranks share the
requests (pretrain/downstream/harness_lm.py). Its report lands in <run>/downstream/step_N.
Tasks load once, before the first step: a bad task name stops the run there (exit 2).
"""

from __future__ import annotations

import torch.distributed as dist

from pretrain.callbacks import Callback
from pretrain.model.generate import ExitRule


class Downstream(Callback):
    name = "downstream"

    def __init__(self, cfg):
        self.d = cfg.train.downstream
        self.tasks = None

    def on_fit_start(self, trainer) -> None:
        from pretrain.downstream.tasks import load_tasks

        self.tasks = load_tasks(self.d.tasks, None if self.d.num_fewshot < 0 else self.d.num_fewshot,
                                self.d.include_path, where="train.downstream.tasks")

    def on_step_end(self, trainer) -> None:
        if trainer.step % self.d.every and trainer.step != trainer.cfg.train.max_steps:
            return
        if trainer.saved_step != trainer.step:
            trainer.save_checkpoint()
        trainer.wait_for_checkpoint()
        if dist.is_initialized():
            dist.barrier()  # rank 0 seals the checkpoint
        trainer.emit(self.evaluate(trainer, trainer.checkpoint_dir(trainer.step)), kind="downstream")

    def evaluate(self, trainer, path) -> dict[str, float]:
        from pretrain.checkpoint.offline import load_model
        from pretrain.downstream.report import write_report
        from pretrain.downstream.run import evaluate_model, headline

        trained = trainer.cfg.model.loops
        loops = self.d.loops or [trained]
        cfg, model = load_model(path, [("model.loops", max(loops))] if max(loops) != trained else [])
        results = evaluate_model(cfg, model.to(trainer.device), self.tasks, loops,
                                 [ExitRule.parse(e) for e in self.d.exits], batch_size=self.d.batch_size,
                                 limit=self.d.limit or None, bootstrap_iters=0)
        if trainer.topo.is_main:
            write_report(trainer.out_dir / "downstream" / path.name, results)
        metrics = {}
        for s, per_task in headline(results).items():
            for task, value in per_task.items():
                metrics[f"downstream/{task}/{s.name}"] = value
                used = results[s]["looped"]["mean_loops"].get(task)
                if s.rule.kind != "all" and used is not None:
                    metrics[f"downstream/{task}/{s.name}/mean_loops"] = used
        return metrics
