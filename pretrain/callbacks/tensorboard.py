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
            from pretrain.config import dotted_fields, dump_config

            self.writer.add_text("config", f"```yaml\n{dump_config(trainer.cfg)}```", trainer.step)
            # hparams take numbers, booleans and strings: lists (e.g. data.paths) as text
            hparams = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
                       for k, v in dotted_fields(trainer.cfg.to_dict()).items()}
            self.writer.add_hparams(hparams, {}, run_name=".")

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for key, value in metrics.items():
                self.writer.add_scalar(key, value, step)

    def on_fit_end(self, trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
