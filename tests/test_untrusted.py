"""Files from elsewhere run no code: a checkpoint's DCP metadata is unpickled through an
allow-list (pretrain/checkpoint/metadata.py)."""

from __future__ import annotations

import os
import pickle
import shutil

import pytest

from pretrain.checkpoint import CheckpointError
from pretrain.checkpoint.metadata import read_metadata
from pretrain.cli import main
from pretrain.train import Trainer
from tests.conftest import ROOT, tiny_config


class _Payload:
    """What an attacker puts in `.metadata`: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), f"train.out_dir={out}",
                 f"data.paths=[{ROOT / 'data/sample.txt'}]", "data.validation=[]",
                 "train.max_steps=1", "optim.warmup_steps=0", "train.log_every=1"]) == 0
    return out / "checkpoints/step_0000001"


def test_our_own_metadata_reads_through_the_allow_list(checkpoint):
    md = read_metadata(checkpoint / ".metadata")
    assert "model/embed.weight" in md.state_dict_metadata


@pytest.mark.parametrize("command", ["export", "generate", "eval", "convert", "resume"])
def test_a_crafted_metadata_runs_nothing_and_is_one_line(checkpoint, tmp_path, command, capsys):
    bad = tmp_path / "step_0000001"
    shutil.copytree(checkpoint, bad)
    marker = tmp_path / "pwned"
    (bad / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    args = {"export": ["export", "--checkpoint", str(bad), "--out", str(tmp_path / "hf")],
            "generate": ["generate", "--checkpoint", str(bad), "--prompt", "a"],
            "eval": ["eval", "--checkpoint", str(bad), "--batches", "1"],
            "convert": ["checkpoint", "convert", str(bad), "--out", str(tmp_path / "c")]}
    if command == "resume":
        trainer = Trainer(tiny_config("train.max_steps=2", "optim.warmup_steps=0",
                                      out_dir=tmp_path / "r"), log=None,
                          tensorboard=False)
        with pytest.raises(CheckpointError, match="refused: it asks for posix.system"):
            trainer.resume(str(bad))
    else:
        assert main(args[command]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "refused: it asks for posix.system" in err, err
    assert not marker.exists()
