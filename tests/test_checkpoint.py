"""Sharded checkpoints: exact resume (in-process, after kill -9, after a signal), resharding
across TP/PP/DP/ZeRO layouts, crash-safe sealing, corruption and compatibility errors."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.exit_codes import EXIT_PREEMPTED
from pretrain.checkpoint import CheckpointError, store
from pretrain.checkpoint.offline import load_model
from pretrain.cli import main
from pretrain.run.status import losses_by_step
from pretrain.train import Trainer
from tests.conftest import ROOT, VARIANTS, tiny_config
from tests.distributed import child_env, free_port, torchrun

# 8 steps, checkpoints at 4 and 8; vocab 260 so TP=2 splits it
SHORT = ["model.vocab_size=260", "train.max_steps=8", "optim.warmup_steps=2",
         "train.checkpoint_every=4", "train.log_every=1", "train.seq_len=32"]


def _trainer(out: Path, *overrides: str) -> Trainer:
    return Trainer(tiny_config(*SHORT, *overrides, out_dir=out), log=lambda _: None,
                   tensorboard=False)


def _losses(summary) -> dict[int, float]:
    return {s["step"]: s["train/loss"] for s in summary.history}


MODE_RESUMES = {f"mode-{v}": VARIANTS[v] for v in ("lt", "lt_i", "lt_ia", "flt_res")}
MODE_RESUMES["flt-recipe-muon-few"] = [*VARIANTS["flt_recipe"], "optim.name=muon",
                                       "objective.kind=few", "model.vocab_size=320"]
MODE_RESUMES["flt-recipe-zero1"] = [*VARIANTS["flt_recipe"], "parallel.zero_stage=1"]
# Huginn's recipe: R drawn per step from (seed, step), backprop through 2, random states
HUGINN_RECIPE = [*VARIANTS["huginn"], "model.state_std=0.08",
                 "recurrence.sampler=poisson_lognormal", "recurrence.backprop=2"]
MODE_RESUMES["huginn-sampled"] = HUGINN_RECIPE
MODE_RESUMES["huginn-sampled-zero1"] = [*HUGINN_RECIPE, "parallel.zero_stage=1"]
RESUMES = {"sync": [], "async": ["train.async_checkpoint=true"], "zero1": ["parallel.zero_stage=1"],
           **MODE_RESUMES}


@pytest.mark.parametrize("extra", list(RESUMES.values()), ids=list(RESUMES))
def test_resume_in_process_is_bit_identical(tmp_path, extra):
    """Every loop mode, the FLT recipe with Muon and an objective that skips readouts, ZeRO."""
    full = _losses(_trainer(tmp_path / "a", *extra).fit())
    ckpt = tmp_path / "a/checkpoints/step_0000004"
    assert store.is_complete(ckpt) and store.resolve(tmp_path / "a").name == "step_0000008"
    for typed in ("a", "a/checkpoints", "a/checkpoints/latest", "a/checkpoints/step_0000008"):
        assert store.resolve(tmp_path / typed).name == "step_0000008", typed  # as users type it
    resumed = _trainer(tmp_path / "b", *extra)
    resumed.resume(str(ckpt))
    assert resumed.step == 4 and resumed.data.samples_consumed == 4 * 16
    again = _losses(resumed.fit())
    assert again == {k: v for k, v in full.items() if k > 4}  # exact floats


def test_a_format_1_record_still_resumes_exactly(tmp_path):
    """Checkpoints written before the trainer state was one save/load pair spread it over the
    record's top level (format 1); they resume to the same losses, and the state read back is
    the state saved (state_dict / load_state_dict are symmetric)."""
    first = _trainer(tmp_path / "a")
    full = _losses(first.fit())
    ckpt = tmp_path / "a/checkpoints/step_0000004"
    record = json.loads((ckpt / store.META).read_text())
    saved = record["trainer"]
    old = {k: v for k, v in record.items() if k not in ("format", "trainer")}
    old |= {"format": 1, "data": saved["data"], "callbacks": saved["callbacks"],
            "trainer": {"skipped": saved["skipped"], "bad_streak": saved["bad_streak"]}}
    (ckpt / store.META).write_text(json.dumps(old))
    resumed = _trainer(tmp_path / "b")
    resumed.resume(str(ckpt))
    assert resumed.state_dict() == saved
    assert _losses(resumed.fit()) == {k: v for k, v in full.items() if k > 4}
    (ckpt / store.META).write_text(json.dumps({**old, "format": 7}))
    with pytest.raises(CheckpointError, match="unknown checkpoint record format 7"):
        _trainer(tmp_path / "c").resume(str(ckpt))


def test_incompatible_config_is_refused_naming_the_field(tmp_path):
    _trainer(tmp_path / "a", "train.max_steps=4").fit()
    other = _trainer(tmp_path / "b", "model.ffn_hidden_size=128")
    with pytest.raises(CheckpointError, match=r"incompatible checkpoint: model.ffn_hidden_size: "
                                              r"the checkpoint has 176, this run 128"):
        other.resume(str(tmp_path / "a"))


def _train_cli(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs/tiny.yaml"), *SHORT,
            f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={out}", *extra]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_shard_is_named(tmp_path, capsys, damage):
    _trainer(tmp_path / "a", "train.max_steps=4").fit()
    shard = tmp_path / "a/checkpoints/step_0000004/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(_train_cli(tmp_path / "b", "--resume", str(tmp_path / "a"))) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(shard) in err
    assert ("truncated" if damage == "truncate" else "CRC-32") in err


def test_incomplete_saves_are_skipped_cleaned_and_latest_is_last(tmp_path):
    _trainer(tmp_path / "a", "train.checkpoint_every=2", "train.keep_last=2").fit()
    root = tmp_path / "a/checkpoints"
    assert sorted(d.name for d in root.iterdir()) == ["latest", "step_0000006", "step_0000008"]
    assert (root / "latest").read_text().strip() == "step_0000008"
    partial = root / "step_0000010.tmp"  # what a crash mid-save leaves
    shutil.copytree(root / "step_0000008", partial)
    (partial / "meta.json").unlink()
    (partial / "__0_0.distcp").unlink()
    unsealed = root / "step_0000012"  # not ours: a save never leaves this name unsealed
    shutil.copytree(partial, unsealed)
    kept = root / "step_0000004.keep"  # a user's copy of a complete checkpoint
    shutil.copytree(root / "step_0000006", kept)
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        store.resolve(unsealed)
    logs: list[str] = []
    t = Trainer(tiny_config(*SHORT, out_dir=tmp_path / "a"), log=logs.append, tensorboard=False)
    assert t.resume("auto").name == "step_0000008"
    assert not partial.exists()
    assert unsealed.is_dir() and (kept / "meta.json").is_file()  # only step_N.tmp is removed
    assert sum("removing incomplete" in m for m in logs) == 1


def test_sealing_a_step_again_replaces_it_whole(tmp_path):
    """A re-run of a step (resumed from an older checkpoint) moves the old directory aside,
    renames the new one into place, then removes the old: no moment without a complete one."""
    root = tmp_path / "checkpoints"
    for version in ("old", "new"):
        tmp = root / "step_0000004.tmp"
        tmp.mkdir(parents=True)
        (tmp / ".metadata").write_text(version)
        store.seal(tmp, {"step": 4})
    assert (root / "step_0000004/.metadata").read_text() == "new"
    assert sorted(d.name for d in root.iterdir()) == ["latest", "step_0000004"]


def test_convert_consolidates_and_refuses_other_layouts(tmp_path, capsys):
    full = _losses(_trainer(tmp_path / "a").fit())
    src = tmp_path / "a/checkpoints/step_0000004"
    assert main(["checkpoint", "convert", str(src), "--to-layout", "tp=2,pp=1",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--to-layout" in capsys.readouterr().err
    assert main(["checkpoint", "convert", str(src), "--out", str(tmp_path / "c")]) == 0
    out = tmp_path / "c/step_0000004"
    assert [f.name for f in out.glob("*.distcp")] == ["__0_0.distcp"]
    a, b = load_model(src)[1].state_dict(), load_model(out)[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the consolidated checkpoint carries the optimizer: resuming it is still exact
    t = _trainer(tmp_path / "d")
    t.resume(str(out))
    assert _losses(t.fit()) == {k: v for k, v in full.items() if k > 4}


# ---- subprocesses: kill -9, signals, crashes -----------------------------------------------

def _popen(out: Path, *extra: str) -> subprocess.Popen:
    env = child_env()
    return subprocess.Popen([sys.executable, "-m", "pretrain.cli", *_train_cli(out, *extra)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_step(proc: subprocess.Popen, out: Path, step: int) -> None:
    deadline = time.time() + 120
    while max(losses_by_step(out), default=0) < step:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.002)


LONG = ["train.max_steps=60", "train.checkpoint_every=5", "train.micro_batch_size=32"]


@pytest.fixture(scope="module")
def long_losses(tmp_path_factory) -> dict[int, float]:
    """The uninterrupted LONG run's losses, which every interrupted one must reproduce (one
    run for the module: the same config gives the same losses bit for bit)."""
    out = tmp_path_factory.mktemp("long-ref")
    ref = _popen(out, *LONG)
    assert ref.wait(300) == 0, ref.communicate()
    return losses_by_step(out)


@pytest.mark.multiproc
def test_kill_9_then_resume_gives_the_uninterrupted_losses(tmp_path, long_losses):
    kill_at = random.Random().randint(7, 45)  # a random step; printed on failure
    run = _popen(tmp_path / "run", *LONG)
    _wait_for_step(run, tmp_path / "run", kill_at)
    run.send_signal(signal.SIGKILL)
    assert run.wait(60) == -signal.SIGKILL
    assert max(losses_by_step(tmp_path / "run")) < 60, f"finished before the kill at {kill_at}"
    again = _popen(tmp_path / "run", *LONG, "--resume", "auto")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resumed from" in out
    assert losses_by_step(tmp_path / "run") == long_losses, f"killed at {kill_at}"


@pytest.mark.multiproc
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_checkpoints_exits_75_and_resumes_exactly(tmp_path, sig, long_losses):
    run = _popen(tmp_path / "run", *LONG)
    _wait_for_step(run, tmp_path / "run", 12)
    run.send_signal(sig)
    out, err = run.communicate(timeout=120)
    assert run.returncode == EXIT_PREEMPTED, err
    stopped = max(losses_by_step(tmp_path / "run"))
    assert stopped < 60 and store.resolve(tmp_path / "run").name == f"step_{stopped:07d}"
    assert f"checkpoint {tmp_path / 'run/checkpoints'}/step_{stopped:07d} at step {stopped}" in out
    again = _popen(tmp_path / "run", *LONG, "--resume", "auto")
    assert again.wait(300) == 0
    assert losses_by_step(tmp_path / "run") == long_losses


@pytest.mark.multiproc
def test_a_term_after_the_agreed_preemption_leaves_exit_75():
    """srun --kill-on-bad-exit sends TERM to the other ranks as soon as one exits 75; one that
    is still leaving must exit 75 too, not die of the TERM (143: the job would not requeue)."""
    script = ("import os, signal, sys, torch\n"
              "from pretrain.run.preemption import PreemptionSignal\n"
              "p = PreemptionSignal(); p.install()\n"
              f"os.kill(os.getpid(), {int(signal.SIGUSR1)})\n"
              "assert p.agreed(torch.device('cpu'))[0]\n"
              "p.uninstall()  # the trainer's end, as after the preemption checkpoint\n"
              f"os.kill(os.getpid(), {int(signal.SIGTERM)})\n"
              f"sys.exit({EXIT_PREEMPTED})\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == EXIT_PREEMPTED, res.stderr


def _children(pid: int) -> list[int]:
    kids = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in kids.read_text().split()] if kids.exists() else []


@pytest.mark.multiproc
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "-m", "pretrain.cli",
           *_train_cli(tmp_path / "run", *LONG, "parallel.data=2", "train.micro_batch_size=16")]
    env = child_env()
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    _wait_for_step(launcher, tmp_path / "run", 8)
    workers = _children(launcher.pid)
    assert len(workers) == 2
    os.kill(workers[-1], signal.SIGUSR1)  # as if only one node got SLURM's warning
    out, err = launcher.communicate(timeout=120)
    stopped = max(losses_by_step(tmp_path / "run"))
    assert stopped < 60, err
    assert store.resolve(tmp_path / "run").name == f"step_{stopped:07d}"
    assert f"exit {EXIT_PREEMPTED}" in out
    assert "exitcode  : 75" in err  # torchrun reports the ranks' status
    torchrun(2, "-m", "pretrain.cli", *_train_cli(tmp_path / "run", *LONG, "parallel.data=2",
                                                  "train.micro_batch_size=16", "--resume", "auto"))
    assert max(losses_by_step(tmp_path / "run")) == 60


# ---- resharding and crashes under several layouts ------------------------------------------

def _layout_run(tmp_path: Path, name: str, nproc: int, *extra: str) -> dict:
    out = tmp_path / f"{name}.json"
    args = ["-m", "tests.multiproc.ckpt_run", "--out", str(out), *SHORT,
            f"train.out_dir={tmp_path / name}", *extra]
    if nproc > 1:
        torchrun(nproc, *args)
    else:
        env = child_env()
        subprocess.run([sys.executable, *args], cwd=ROOT, env=env, check=True,
                       capture_output=True)
    res = json.loads(out.read_text())
    res["weights"] = torch.load(f"{out}.pt", weights_only=True)
    return res


LAYOUTS = {  # name: (processes, overrides); each keeps the global batch at 16 samples
    "dp2": (2, ["parallel.data=2", "train.micro_batch_size=8"]),
    "tp2": (2, ["parallel.tensor=2", "train.micro_batch_size=16"]),
    "pp2": (2, ["parallel.pipeline=2", "train.micro_batch_size=8", "train.grad_accum_steps=2"]),
    # the head tied to the embedding: both ends of the ring hold it, the checkpoint one copy
    "pp2_tied": (2, ["parallel.pipeline=2", "train.micro_batch_size=8", "train.grad_accum_steps=2",
                     "model.tie_embeddings=true"]),
    "zero1_dp2": (2, ["parallel.data=2", "parallel.zero_stage=1", "train.micro_batch_size=8"]),
    "dp4": (4, ["parallel.data=4", "train.micro_batch_size=4"]),
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """The uninterrupted SHORT run of a layout ("one": one process), run once for the module
    (the tests only read its losses and checkpoints): layout -> (result, its directory)."""
    done: dict[str, tuple[dict, Path]] = {}

    def get(layout: str) -> tuple[dict, Path]:
        if layout not in done:
            root = tmp_path_factory.mktemp(f"full-{layout}")
            nproc, overrides = LAYOUTS.get(layout, (1, ["train.micro_batch_size=16"]))
            done[layout] = _layout_run(root, "full", nproc, *overrides), root / "full"
        return done[layout]
    return get


@pytest.mark.multiproc
@pytest.mark.parametrize("layout", ["dp2", "tp2", "pp2", "pp2_tied", "zero1_dp2"])
def test_resume_under_one_process_reshards_exactly(tmp_path, layout, full_run):
    nproc, overrides = LAYOUTS[layout]
    full, run_dir = full_run(layout)
    ckpt = run_dir / "checkpoints/step_0000004"
    same = _layout_run(tmp_path, "same", nproc, *overrides, "--resume", str(ckpt))
    model = [o for o in overrides if o.startswith("model.")]
    one = _layout_run(tmp_path, "one", 1, "train.micro_batch_size=16", *model,
                      "--resume", str(ckpt))
    assert same["losses"] == {k: v for k, v in full["losses"].items() if int(k) > 4}
    for step, loss in same["losses"].items():
        # another layout after the resume: fp32 rounding of the reductions, carried by AdamW
        # only through weights whose gradient is ~zero (test_tensor_parallel.py's CLI test)
        assert abs(one["losses"][step] - loss) <= 1e-5 * abs(loss), step
    reference = load_model(ckpt)[1].state_dict()
    for weights in (same["weights"], one["weights"]):
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference)


@pytest.mark.multiproc
def test_one_process_checkpoint_resumes_under_tp2_pp2_dp2_and_dp4(tmp_path, full_run):
    full, run_dir = full_run("one")
    ckpt = run_dir / "checkpoints/step_0000004"
    reference = load_model(ckpt)[1].state_dict()
    for name in ("tp2", "pp2", "dp2", "dp4"):
        nproc, overrides = LAYOUTS[name]
        res = _layout_run(tmp_path, name, nproc, *overrides, "--resume", str(ckpt))
        assert all(torch.equal(res["weights"][k], reference[k]) for k in reference)
        for step, loss in res["losses"].items():
            assert abs(full["losses"][step] - loss) <= 1e-5 * abs(loss), (name, step)  # as above


@pytest.mark.multiproc
def test_a_crash_mid_save_leaves_the_previous_checkpoint(tmp_path, full_run):
    overrides = LAYOUTS["tp2"][1]
    ref, _ = full_run("tp2")
    with pytest.raises(AssertionError, match="failed"):
        _layout_run(tmp_path, "run", 2, *overrides, "--crash-rank0-at-save", "8")
    root = tmp_path / "run/checkpoints"
    partial = root / "step_0000008.tmp"
    assert partial.is_dir() and not (partial / "meta.json").exists()
    assert (root / "latest").read_text().strip() == "step_0000004"
    resumed = _layout_run(tmp_path, "run", 2, *overrides, "--resume", "auto")
    assert not partial.exists()
    assert resumed["losses"] == {k: v for k, v in ref["losses"].items() if int(k) > 4}


@pytest.mark.multiproc
def test_a_signal_to_the_whole_process_group_spares_the_data_workers(tmp_path):
    """SLURM signals every process of a step, DataLoader workers included: they must survive
    it, so the trainer can checkpoint and exit 75 instead of failing on a lost worker."""
    data, sample = tmp_path / "data", str(ROOT / "data/sample.txt")
    assert main(["data", "train-tokenizer", "--input", sample, "--vocab-size", "300",
                 "--output", str(data / "tok.json")]) == 0
    assert main(["data", "tokenize", "--input", sample, "--tokenizer", str(data / "tok.json"),
                 "--output", str(data / "shards"), "--shard-tokens", "2048",
                 "--chunk-tokens", "256"]) == 0
    shards = ["data.source=shards", f"data.sources=[{{path: {data / 'shards'}}}]",
              f"data.tokenizer={data / 'tok.json'}", "model.vocab_size=300", "data.num_workers=2",
              # the step the signal lands in needs more micro-batches than are prefetched
              "data.prefetch=1", *LONG, "train.micro_batch_size=2", "train.grad_accum_steps=16"]
    ref = _popen(tmp_path / "ref", *shards)
    assert ref.wait(300) == 0, ref.communicate()
    env = child_env()
    run = subprocess.Popen([sys.executable, "-m", "pretrain.cli", *_train_cli(tmp_path / "run",
                                                                               *shards)],
                           cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, start_new_session=True)
    _wait_for_step(run, tmp_path / "run", 10)
    os.killpg(run.pid, signal.SIGUSR1)
    out, err = run.communicate(timeout=120)
    assert run.returncode == EXIT_PREEMPTED, err[-2000:]
    again = _popen(tmp_path / "run", *shards, "--resume", "auto")
    assert again.wait(300) == 0
    assert losses_by_step(tmp_path / "run") == losses_by_step(tmp_path / "ref")


@pytest.mark.parametrize("order", ["stack", "interleave"])
def test_grow_duplicates_layers_and_resumes(tmp_path, order, capsys):
    """`pretrain checkpoint grow`: a 2-layer checkpoint to 4 layers; every grown layer is an
    exact copy of its source layer, the rest is copied, the config follows the overrides, and
    training resumes from it."""
    src = _grow_source(tmp_path)
    assert main(["checkpoint", "grow", "--from", str(src), "--layers", "4", "--order", order,
                 "--out", str(tmp_path / "grown"), "model.loops=2", "objective.beta=0.05"]) == 0
    assert "grown to 4 shared layers" in capsys.readouterr().out
    cfg_old, old = load_model(src)
    cfg, new = load_model(tmp_path / "grown")
    assert cfg.model.num_layers == 4 and cfg.model.loops == 2 and cfg.objective.beta == 0.05
    a, b = old.state_dict(), new.state_dict()
    want = [0, 1, 0, 1] if order == "stack" else [0, 0, 1, 1]
    for name, value in b.items():
        if name.startswith("block."):
            _, i, rest = name.split(".", 2)
            assert torch.equal(value, a[f"block.{want[int(i)]}.{rest}"]), name
        else:
            assert torch.equal(value, a[name]), name
    trainer = Trainer(dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, max_steps=2, out_dir=str(tmp_path / "run2"))), log=lambda _: None,
        tensorboard=False)
    trainer.resume(str(tmp_path / "grown"))
    assert trainer.step == 0 and trainer.fit(save=False).history[-1]["train/loss"] < 10


@pytest.mark.parametrize("layers,message", [
    (3, "--layers: 3 is not a multiple (> 1x) of the checkpoint's 2 shared layers "
        "(model.num_layers)"),
    (2, "--layers: 2 is not a multiple"), ])
def test_grow_that_does_not_multiply_cleanly_is_refused(tmp_path, layers, message, capsys):
    src = _grow_source(tmp_path)
    assert main(["checkpoint", "grow", "--from", str(src), "--layers", str(layers),
                 "--out", str(tmp_path / "g")]) == 2
    assert capsys.readouterr().err.startswith(f"pretrain: error: {message}")


def _grow_source(tmp_path):
    cfg = tiny_config("train.max_steps=2", "optim.warmup_steps=1", out_dir=tmp_path / "src")
    Trainer(cfg, log=lambda _: None, tensorboard=False).fit()
    return tmp_path / "src/checkpoints/step_0000002"
