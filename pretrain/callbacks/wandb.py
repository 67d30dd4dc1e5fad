"""Weights & Biases (opt-in: `train.wandb_project`, `pip install '.[wandb]'`). The run id is
kept in the checkpoint with the run directory it belongs to, so a resumed job continues the
same W&B run -- and a job resuming someone else's checkpoint starts its own. The uploaded
config has its url_templates redacted (they may carry credentials). Offline clusters set
WANDB_MODE=offline and `wandb sync` later."""

from __future__ import annotations

import copy
import reprlib

from pretrain.callbacks import Callback
from pretrain.checkpoint import CheckpointError

REDACTED = "<redacted>"


def redacted(tree: dict) -> dict:
    """The config as uploaded: every data source's url_template replaced."""
    out = copy.deepcopy(tree)
    for kind in ("sources", "validation"):
        for source in out.get("data", {}).get(kind, []):
            if source.get("url_template"):
                source["url_template"] = REDACTED
    return out


class WandB(Callback):
    name = "wandb"

    def __init__(self, project: str):
        self.project, self.run, self.run_id, self.run_dir = project, None, None, None

    def on_fit_start(self, trainer) -> None:
        if not trainer.topo.is_main or self.run is not None:
            return
        import wandb

        here = str(trainer.out_dir.resolve())
        same_run = self.run_dir == here
        self.run = wandb.init(project=self.project, name=trainer.out_dir.name,
                              id=self.run_id if same_run else None, resume="allow",
                              dir=here, config=redacted(trainer.cfg.to_dict()))
        self.run_id, self.run_dir = self.run.id, here

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def on_fit_end(self, trainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id, "run_dir": self.run_dir}

    def load_state_dict(self, state: dict) -> None:
        self.run_id, self.run_dir = state.get("run_id"), state.get("run_dir")
        for key, value in state.items():
            if value is not None and not isinstance(value, str):
                raise CheckpointError(f"meta.json: trainer.callbacks.wandb: {key} is "
                                      f"{reprlib.repr(value)}, not a string")
