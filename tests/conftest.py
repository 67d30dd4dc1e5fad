from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]

# deterministic cuBLAS (every test runs with torch.use_deterministic_algorithms): must be set
# before CUDA starts, so here, at collection
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pin_fp32() -> None:
    """fp32 matmuls in full fp32 whatever the environment says: NGC images may set
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 (read when cuBLAS starts, so dropped here, at
    collection), which would turn the CUDA tier's fp32 comparisons with the CPU into TF32 ones."""
    os.environ.pop("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", None)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


pin_fp32()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (the CUDA tier: pytest -m cuda)")
# a test parametrised over DEVICES runs on CPU everywhere and on CUDA in the CUDA tier
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])]


def tiny_config(*overrides: str, out_dir: str | Path = "runs/test"):
    """configs/tiny.yaml with overrides; paths resolved from the repo root."""
    return load_config(ROOT / "configs/tiny.yaml",
                       [f"data.paths=[{ROOT / 'data/sample.txt'}]",
                        f"data.validation=[{{path: {ROOT / 'data/validation.txt'}}}]",
                        f"train.out_dir={out_dir}",
                        *overrides])


def tiny_train_args(out_dir: str | Path, *overrides: str) -> list[str]:
    """`pretrain train` on configs/tiny.yaml and the bundled text, no held-out data, into
    `out_dir` (argv for pretrain.cli.main)."""
    return ["train", "--config", str(ROOT / "configs/tiny.yaml"), f"train.out_dir={out_dir}",
            f"data.paths=[{ROOT / 'data/sample.txt'}]", "data.validation=[]",
            "optim.warmup_steps=0", "train.log_every=1", *overrides]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory trained 2 steps with a checkpoint at each (read-only to tests: copy it
    before changing anything)."""
    from pretrain.cli import main

    out = tmp_path_factory.mktemp("tiny_run")
    assert main(tiny_train_args(out, "train.max_steps=2", "train.checkpoint_every=1")) == 0
    return out


# the FLT authors' layer recipe (their init aside: zero output projections would hide bugs)
FLT_RECIPE = ["model.sandwich_norm=false", "model.norm_weights=false", "model.qk_norm=true",
              "model.mlp=relu2", "model.logit_softcap=15", "model.rope_reverse=true"]
LOOP_MODES = ("ouro", "lt", "lt_i", "lt_ia", "flt", "flt_res")  # huginn: its own variant below
VARIANTS = {
    **{mode: [f"model.loop_mode={mode}"] for mode in LOOP_MODES},
    "flt_recipe": ["model.loop_mode=flt", *FLT_RECIPE],
    "ouro_no_norm": ["model.norm_between_loops=false"],  # the ablation
    "prelude_coda": ["model.prelude_layers=1", "model.coda_layers=1",
                     "model.tie_embeddings=true", "model.sandwich_norm=false"],
    # Huginn-0125's function (state_std 0: a zero initial state, so every call is the same)
    "huginn": ["model.loop_mode=huginn", "model.prelude_layers=1", "model.coda_layers=1",
               "model.tie_embeddings=true", "model.sandwich_style=huginn", "model.qk_bias=true",
               "model.embed_scale=8", "objective.kind=last"],
    # Parcae's function (pretrain/model/families/parcae.py): a value embedding in every segment
    # (prelude 2, block 2, coda 2: the second layer of each), a zero initial state
    "parcae": ["model.loop_mode=parcae", "model.prelude_layers=2", "model.coda_layers=2",
               "model.tie_embeddings=true", "model.sandwich_norm=false", "model.qk_norm=true",
               "model.mlp=relu2_half", "objective.kind=last"],
}

# what the multi-process equivalence checks run: the modes with distinct handovers, and an
# objective that reads out only some loop steps
PARALLEL_VARIANTS = {**{v: VARIANTS[v] for v in ("ouro", "lt_i", "lt_ia", "flt_recipe", "flt_res")},
                     "flt_few": [*VARIANTS["flt_recipe"], "objective.kind=few"]}


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    pin_fp32()
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(autouse=True)
def _no_process_group_survives():
    """An in-process ZeRO trainer owns a private process group of size 1 (parallelism/zero.py)
    that the CLI's shutdown would destroy; tests end without the CLI, so the group goes here
    and the next test, in any order, starts with none."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
