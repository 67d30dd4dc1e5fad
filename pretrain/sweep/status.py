"""`pretrain status` on a sweep directory: each point's state and last loss."""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import store
from pretrain.run.status import last_metrics, reached_step, run_state
from pretrain.sweep.collect import read_index


def sweep_status(sweep_dir: Path) -> str:
    """Each point's state and last loss, and how many finished."""
    indices, _ = read_index(sweep_dir)
    lines, done = [], 0
    for index in indices:
        run_dir = sweep_dir / "points" / str(index)
        m = last_metrics(run_dir)
        ckpt = store.newest(run_dir / "checkpoints")
        saved = store.read_meta(ckpt)["step"] if ckpt else None
        state = run_state(run_dir, reached_step(saved, m))
        done += state.startswith("finished")
        loss = f", train loss {m['train/loss']:.4f}" if m else ""
        lines.append(f"  point {index}: {state}{loss}")
    return "\n".join([f"sweep: {sweep_dir}: {done} of {len(indices)} points finished", *lines])
