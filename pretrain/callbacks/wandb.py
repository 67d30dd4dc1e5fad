"""Weights & Biases (opt-in: `train.wandb_project`, `pip install '.[wandb]'`). The run id is
kept in the checkpoint, so a resumed job continues the same W&B run. Offline clusters set
WANDB_MODE=offline and `wandb sync` later."""

from __future__ import annotations

from pretrain.callbacks import Callback


class WandB(Callback):
    name = "wandb"

    def __init__(self, project: str):
        self.project, self.run, self.run_id = project, None, None

    def on_fit_start(self, trainer) -> None:
        if not trainer.topo.is_main or self.run is not None:
            return
        import wandb

        self.run = wandb.init(project=self.project, name=trainer.out_dir.name, id=self.run_id,
                              resume="allow", dir=str(trainer.out_dir),
                              config=trainer.cfg.to_dict())
        self.run_id = self.run.id

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def on_fit_end(self, trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")
