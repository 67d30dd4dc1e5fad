"""TensorBoard scalars under the run's tensorboard/ directory (main rank only)."""

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

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
