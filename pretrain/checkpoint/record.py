"""A checkpoint's record (meta.json): what no tensor holds.

    {"format": 2, "step": N, "tokens": N, "layout": {...}, "trainer": Trainer.state_dict(),
     provenance: seed, lr, code_version, torch, time, slurm_restart_count; "files": sizes/CRCs}

`step` and `tokens` name the checkpoint for readers that never build a trainer (`pretrain
status`, sweeps, conversion); `trainer` is handed back whole to `Trainer.load_state_dict`.
Format 1 (before the trainer state had one save/load pair) spread that state over the top
level; `trainer_state` reads both, so those checkpoints still resume.
"""

from __future__ import annotations

from pretrain.checkpoint.store import CheckpointError

FORMAT = 2


def make_record(trainer_state: dict, tokens: int, layout: dict, **provenance) -> dict:
    return {"format": FORMAT, "step": trainer_state["step"], "tokens": tokens, "layout": layout,
            "trainer": trainer_state, **provenance}


def fresh_trainer_state(step: int = 0) -> dict:
    """The state of a trainer that has not trained: a model-only checkpoint (imported weights,
    upcycling) resumes from `step` with a fresh optimizer and the data from its start."""
    return {"step": step, "skipped": 0, "bad_streak": 0, "callbacks": {},
            "data": {"samples_consumed": 0, "skipped_samples": 0, "fingerprint": {}}}


def trainer_state(record: dict, where: str = "meta.json") -> dict:
    """`Trainer.load_state_dict`'s input from a record of either format."""
    fmt = record.get("format")
    if fmt == FORMAT:
        return record["trainer"]
    if fmt == 1:
        return {"step": record["step"], **record["trainer"], "data": record["data"],
                "callbacks": record.get("callbacks", {})}
    raise CheckpointError(f"{where}: unknown checkpoint record format {fmt!r} (this version "
                          f"reads 1 and {FORMAT})")
