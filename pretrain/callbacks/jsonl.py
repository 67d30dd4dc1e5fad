"""metrics.jsonl: one JSON line per metric dict (the names TensorBoard uses), for
`pretrain status`, sweeps and scripts. A line cut short by a crash is skipped by readers."""

from __future__ import annotations

import json
import time

from core.durable import open_no_link
from pretrain.callbacks import Callback


class MetricsFile(Callback):
    name = "metrics_file"

    def on_log(self, trainer, step: int, metrics: dict[str, float]) -> None:
        if trainer.topo.is_main:
            with open_no_link(trainer.out_dir / "metrics.jsonl", append=True) as fh:
                fh.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")
