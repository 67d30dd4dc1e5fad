"""TensorBoard under the run's tensorboard/ directory (main rank only): the scalars, and the
resolved config as text and as hparams (its scalar and string fields, dotted)."""

from __future__ import annotations

from pretrain.callbacks import Callback


class TensorBoard(Callback):
    name = "tensorboard"

    def __init__(self):
        self.writer = None

    def on_fit_start(self, trainer) -> None:
        if trainer.topo.is_main and self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.out_dir / "tensorboard"))
            from pretrain.config import dump_config

            self.writer.add_text("config", f"```yaml\n{dump_config(trainer.cfg)}```", trainer.step)
            self.writer.add_hparams(hparams(trainer.cfg.to_dict()), {}, run_name=".")

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def hparams(tree: dict, prefix: str = "") -> dict:
    """The config's numbers, booleans and strings as {"section.field": value}; lists as text."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat
