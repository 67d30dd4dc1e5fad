"""`pretrain doctor` on this (CPU) node: every component has its line, the verdict says plainly
that there is no GPU, and a run config's unmet needs block it (exit 1)."""

from __future__ import annotations

import pytest
import torch

from pretrain.cli import main
from pretrain.planning import doctor
from tests.conftest import ROOT

TINY = str(ROOT / "configs/tiny.yaml")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU node's report")
def test_a_cpu_node_is_degraded_and_says_why(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines()}
    for what in ("torch", "CUDA", "megatron-core", "deepspeed", "mpi4py", "apex", "attention",
                 "optimizer", "peak", "bf16", "memory", "launcher"):
        assert what in lines, (what, out)
    assert "no CUDA device: CPU only" in lines["CUDA"]
    assert "SDPA" in lines["attention"] and "AdamW" in lines["optimizer"]
    assert "single: rank 0 of 1" in lines["launcher"]
    assert out.splitlines()[-1] == "verdict: degraded: no GPU (CPU only)"


def test_a_config_whose_needs_are_unmet_is_blocked(monkeypatch, capsys):
    real = doctor.version
    monkeypatch.setattr(doctor, "version", lambda d: None if d == "megatron-core" else real(d))
    status = main(["doctor", "--config", TINY, "parallel.tensor=2", "model.vocab_size=258"])
    assert status == doctor.EXIT_BLOCKED
    out = capsys.readouterr().out
    assert "megatron-core  not installed (tensor/sequence parallel unavailable)" in out
    assert "the config's layout needs 2 processes" in out
    assert out.splitlines()[-1].startswith(
        "verdict: blocked: parallel.tensor=2 needs megatron-core (not installed)")


def test_the_verdict_names_every_reason():
    f = doctor.Finding
    assert doctor.report([f("a", "x")]) == ("a              x\nverdict: ready", 0)
    text, status = doctor.report([f("a", "x", "degraded", "slow"), f("b", "y", "degraded", "no apex")])
    assert text.endswith("verdict: degraded: slow; no apex") and status == 0
    text, status = doctor.report([f("a", "x", "degraded", "slow"), f("c", "", "blocked", "no ZeRO")])
    assert text.endswith("verdict: blocked: no ZeRO") and status == doctor.EXIT_BLOCKED
