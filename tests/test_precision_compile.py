"""Precision, compiled layers and the run header: `train.precision`, `train.compile`, and
what recompute / compile refuse to combine with."""

from __future__ import annotations

import tempfile

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from pretrain.cli import main
from pretrain.train import Trainer
from tests.conftest import DEVICES, ROOT, tiny_config

# bf16 autocast against fp32 over 50 steps: the trajectories part slowly (a loss spike at a
# batch of 4 x 32 tokens lands a little differently), the curves do not
BF16_STEP_TOLERANCE = 0.05  # relative, any single step
BF16_CURVE_TOLERANCE = 0.01  # relative, the mean of the last 10 steps


def _losses(*overrides: str) -> list[float]:
    cfg = tiny_config("train.log_every=1", *overrides, out_dir=tempfile.mkdtemp(prefix="precision-"))
    return [s["train/loss"] for s in Trainer(cfg, log=None, tensorboard=False).fit(save=False).history]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_follows_fp32_for_50_steps(device):
    """bf16 autocast (fp32 weights, optimizer state and loss) trains the same curve as fp32
    within the stated tolerances -- and is not fp32 (autocast did engage)."""
    small = ["train.max_steps=50", "train.micro_batch_size=4", "train.seq_len=32",
             f"train.device={device}"]
    fp32, bf16 = _losses(*small), _losses(*small, "train.precision=bf16")
    assert fp32 != bf16
    worst = max(abs(a - b) / a for a, b in zip(fp32, bf16, strict=True))
    assert worst < BF16_STEP_TOLERANCE, worst
    assert abs(sum(bf16[-10:]) / sum(fp32[-10:]) - 1) < BF16_CURVE_TOLERANCE
    assert bf16[-1] < bf16[0] - 1.0  # and it learns


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_layer_is_one_graph_for_every_loop_and_step(device):
    """`train.compile`: the decoder layer compiles once (inductor: C++ on CPU, Triton on CUDA)
    and serves both layers of the block on all R loops for three steps -- no recompile -- with
    the eager losses."""
    run = ["train.max_steps=3", "optim.warmup_steps=0", f"train.device={device}"]
    eager = _losses(*run)
    torch._dynamo.reset()
    counters.clear()
    compiled = _losses(*run, "train.compile=true")
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(counters["recompiles"].values()) == 0
    # inductor fuses the elementwise ops (other fp32 rounding, ~1e-7 per op)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-5, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("overrides,message", [
    (["train.compile=true", "parallel.tensor=2", "model.vocab_size=260"],
     "train.compile: cannot compile megatron-core's tensor-parallel layers (parallel.tensor 2)"),
    (["train.compile=true", "train.recompute=selective"],
     "train.compile: train.recompute=selective checkpoints inside the compiled layer"),
    (["train.recompute_keep_last_loops=4"],
     "train.recompute_keep_last_loops: must be in 0..model.loops 3, got 4"),
    (["train.recompute=some"], "train.recompute"),
    (["train.precision=fp16"], "train.precision"),
    (["train.loss_chunk_tokens=-1"], "train.loss_chunk_tokens: must be >= 0, got -1"),
])
def test_options_that_cannot_work_fail_in_one_line(overrides, message, capsys):
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), *overrides]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_run_header_names_kernels_and_options(tmp_path, capsys):
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"), "train.max_steps=1",
                 "optim.warmup_steps=0", f"train.out_dir={tmp_path}", "train.recompute=loops",
                 "train.loss_chunk_tokens=16"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines()
                  if line.startswith("kernels:"))
    assert "attention SDPA (CPU flash kernel)" in header and "torch AdamW" in header
    assert "recompute loops (last 1 loops kept)" in header and "loss chunks 16" in header
    assert "fp32" in header and "grad reduce none (one replica)" in header
