"""A checkpoint's record (meta.json): what no tensor holds.

    {"format": 2, "step": N, "tokens": N, "layout": {...}, "trainer": Trainer.state_dict(),
     provenance: seed, lr, code_version, torch, time, slurm_restart_count; "files": sizes/CRCs}

`step` and `tokens` name the checkpoint for readers that never build a trainer (`pretrain
status`, sweeps, conversion); `trainer` is handed back whole to `Trainer.load_state_dict`.
Format 1 (before the trainer state had one save/load pair) spread that state over the top
level; `trainer_state` reads both, so those checkpoints still resume.
"""

from __future__ import annotations

import reprlib

from pretrain.checkpoint.store import CheckpointError, count, field

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
    """`Trainer.load_state_dict`'s input from a record of either format, checked for the
    shape it relies on (counts, a data position, callbacks' states as objects)."""
    fmt = record.get("format")
    if fmt == FORMAT:
        state = field(record, "trainer", dict, where)
    elif fmt == 1:
        state = {"step": record["step"], **field(record, "trainer", dict, where),
                 "data": record.get("data"), "callbacks": record.get("callbacks", {})}
    else:
        raise CheckpointError(f"{where}: unknown checkpoint record format "
                              f"{reprlib.repr(fmt)} (this version reads 1 and {FORMAT})")
    at = f"{where}: trainer"
    for key in ("step", "skipped", "bad_streak"):
        count(state, key, at)
    for name in field(state, "callbacks", dict, at):
        field(state["callbacks"], name, dict, f"{at}.callbacks")
    data = field(state, "data", dict, at)
    return {**state, "data": {**data,
            "samples_consumed": count(data, "samples_consumed", f"{at}.data"),
            "skipped_samples": count(data, "skipped_samples", f"{at}.data", default=0),
            "fingerprint": field(data, "fingerprint", dict, f"{at}.data", default={})}}
