"""A run directory is owned (issue 25, items 4-8): a second run is refused or moves the old one
aside, a live job's lock refuses another, pruning stays inside one trajectory, a damaged newest
checkpoint is passed over, a failed save is one line, and a signal anywhere from setup to the
final save ends in a requeueable exit."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from core.exit_codes import EXIT_CONFIG, EXIT_INTERRUPTED, EXIT_PREEMPTED, PREEMPTED_MARKER
from pretrain.checkpoint import store
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.run.run_dir import RunLock
from pretrain.run.status import losses_by_step
from tests.conftest import ROOT
from tests.distributed import child_env

SHORT = ["model.vocab_size=260", "train.max_steps=8", "optim.warmup_steps=2",
         "train.checkpoint_every=4", "train.log_every=1", "train.seq_len=32", "train.keep_last=0"]


def _cli(out: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(ROOT / "configs/tiny.yaml"), *SHORT,
            f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={out}", *extra]


def _digest(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path -> SHA-256 (checkpoints must stay byte-equal)."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_a_second_fresh_run_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_cli(run, "train.max_steps=4")) == 0
    before = _digest(run / "checkpoints")
    assert main(_cli(run, "train.max_steps=4")) == EXIT_CONFIG
    err = _one_line_error(capsys)
    assert "holds a run's checkpoints (newest step_0000004)" in err and "--resume auto" in err
    assert _digest(run / "checkpoints") == before
    assert main(_cli(run, "train.max_steps=4", "--overwrite")) == 0
    (aside,) = tmp_path.glob("run.old-*")
    assert _digest(aside / "checkpoints") == before  # moved, byte for byte
    assert store.newest(run / "checkpoints").name == "step_0000004"


def test_resuming_an_older_step_sets_the_newer_trajectory_aside_and_prunes_only_its_own(tmp_path):
    """Resume step 4 of a run that reached 8, with keep_last=1: the old step 8 is another
    trajectory (set aside intact, so --resume auto and `latest` agree on the new one), and the
    new run's pruning removes only its own older steps, never the one it just sealed."""
    run = tmp_path / "run"
    assert main(_cli(run)) == 0
    old8 = _digest(run / "checkpoints/step_0000008")
    assert main(_cli(run, "train.keep_last=1", "train.checkpoint_every=2", "train.max_steps=6",
                     "--resume", str(run / "checkpoints/step_0000004"))) == 0
    root = run / "checkpoints"
    assert [d.name for d in store.complete_checkpoints(root)] == ["step_0000006"]
    assert (root / "latest").read_text().strip() == "step_0000006"
    assert _digest(root / "step_0000008.superseded") == old8


def test_pruning_never_removes_the_sealed_step_or_a_newer_one(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        d = store.step_dir(root, step)
        d.mkdir(parents=True)
        for name in store.REQUIRED:
            (d / name).write_text("")
    removed = store.prune(root, 2, store.step_dir(root, 4))
    assert [d.name for d in removed] == []  # 4 and the one before it: 2
    removed = store.prune(root, 1, store.step_dir(root, 4))
    assert [d.name for d in removed] == ["step_0000002"]
    assert [d.name for d in store.complete_checkpoints(root)] == [
        "step_0000004", "step_0000006", "step_0000008"]


def test_a_live_job_holds_the_run_directory_and_a_dead_ones_lock_is_taken_over(tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom pretrain.run.run_dir import RunLock\n"
         f"RunLock({str(run)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(600)\n"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(_cli(run, "train.max_steps=4")) == EXIT_CONFIG
        err = _one_line_error(capsys)
        assert "another live job is running" in err and f'"pid": {holder.pid}' in err
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()  # dies without releasing anything: the kernel drops its flock
        holder.wait()
    assert main(_cli(run, "train.max_steps=4")) == 0
    lock = RunLock(run)
    lock.acquire()  # released at the end of the run above
    assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_a_trainer_fit_from_python_holds_the_lock_too(tmp_path):
    """`Trainer(cfg).fit()` without the CLI takes train.out_dir's lock while it saves: a second
    writer is refused in one line before any step; `fit(save=False)` writes nothing and takes
    none; the lock is free again after the run."""
    from pretrain.train import Trainer
    from tests.conftest import tiny_config

    run = tmp_path / "run"
    cfg = tiny_config("train.max_steps=2", "train.log_every=1", out_dir=run)
    other = RunLock(run)
    other.acquire()
    with pytest.raises(ConfigError, match="another live job is running in this run directory"):
        Trainer(cfg, log=None, tensorboard=False).fit()
    assert not (run / "checkpoints").exists()
    Trainer(cfg, log=None, tensorboard=False).fit(save=False)
    other.release()
    trainer = Trainer(cfg, log=None, tensorboard=False)
    assert trainer.fit().steps == 2 and trainer.run_lock is None
    other.acquire()  # free after the run
    other.release()


def test_resume_auto_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_cli(run)) == 0  # checkpoints at 4 and 8
    uninterrupted = losses_by_step(run)
    shard = run / "checkpoints/step_0000008/__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(_cli(run, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert f"{shard}: shard file is corrupt (CRC-32 mismatch); falling back" in out
    assert (run / "checkpoints/step_0000008.damaged/__0_0.distcp").read_bytes() == bytes(data)
    assert "step_0000004 at step 4" in out
    assert losses_by_step(run) == uninterrupted  # steps 5-8 again, bit-identical


def _run_patched(out: Path, patch: str, *extra: str, preexec=None) -> subprocess.CompletedProcess:
    """`pretrain train` in a child whose code is first changed by `patch` (to raise a signal or
    a fault at a chosen point)."""
    code = (f"import os, signal, sys\n{patch}\nfrom pretrain.cli import main\n"
            f"sys.exit(main({_cli(out, *extra)!r}))\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec)


SIGNAL_DURING = {
    # resuming a 1.4B checkpoint takes minutes: the signal must not kill the job
    "resume": ("from pretrain.checkpoint.checkpointer import Checkpointer as C\n_load = C.load\n"
               "def _slow_load(self, path, entries):\n    os.kill(os.getpid(), signal.SIGUSR1)\n"
               "    return _load(self, path, entries)\nC.load = _slow_load\n"),
    # the final save: the run is complete once it is sealed
    "final save": ("import pretrain.checkpoint.store as s\n_seal = s.seal\n"
                   "def _seal_signalled(tmp, meta):\n"
                   "    if meta['step'] == 8:\n        os.kill(os.getpid(), signal.SIGTERM)\n"
                   "    return _seal(tmp, meta)\ns.seal = _seal_signalled\n"),
}


@pytest.mark.multiproc
@pytest.mark.parametrize("when", list(SIGNAL_DURING))
def test_a_signal_from_setup_to_the_final_save_is_a_requeueable_exit(tmp_path, when):
    run = tmp_path / "run"
    assert main(_cli(run, "train.max_steps=4")) == 0
    res = _run_patched(run, SIGNAL_DURING[when], "--resume", "auto")
    if when == "resume":  # stopped before its first step, on the checkpoint it resumed
        assert res.returncode == EXIT_PREEMPTED, res.stderr
        assert f"checkpoint {run / 'checkpoints'}/step_0000004 at step 4" in res.stdout
        assert "step_0000004 at step 4" in (run / PREEMPTED_MARKER).read_text()  # for sbatch
    else:
        assert res.returncode == 0, res.stderr
        assert store.newest(run / "checkpoints").name == "step_0000008"


@pytest.mark.multiproc
def test_ctrl_c_seals_a_checkpoint_and_says_how_to_continue(tmp_path):
    """SIGINT at step 3 of 8: the step finishes, a checkpoint is sealed, one line gives the
    command that continues (exit 130, not the scheduler's requeue code, no requeue marker);
    that command, pasted, ends with the losses of an uninterrupted run, bit for bit."""
    whole = tmp_path / "whole"
    assert main(_cli(whole)) == 0
    run = tmp_path / "run"
    ctrl_c = ("from pretrain.train import Trainer\n_step = Trainer.train_step\n"
              "def _interrupted(self):\n    if self.step == 2:\n"
              "        os.kill(os.getpid(), signal.SIGINT)\n    return _step(self)\n"
              "Trainer.train_step = _interrupted\n")
    res = _run_patched(run, ctrl_c)
    assert res.returncode == EXIT_INTERRUPTED, res.stderr
    line = res.stdout.strip().splitlines()[-1]
    assert line.startswith(f"pretrain: interrupted (Ctrl-C) at step 3: checkpoint "
                           f"{run / 'checkpoints/step_0000003'} sealed; continue with: pretrain train")
    assert line.endswith(f"--resume auto; exit {EXIT_INTERRUPTED}") and "Traceback" not in res.stderr
    assert not (run / PREEMPTED_MARKER).exists()
    argv = shlex.split(line.split("continue with: ")[1].split(";")[0])
    assert argv[:2] == ["pretrain", "train"]
    assert main(argv[1:]) == 0
    assert losses_by_step(run) == losses_by_step(whole)


def test_a_timed_checkpoint_is_taken_when_due(tmp_path):
    """train.checkpoint_minutes: a checkpoint once that long since the last (here: due at
    once, so after every step), besides train.checkpoint_every."""
    run = tmp_path / "run"
    assert main(_cli(run, "train.checkpoint_every=0", "train.checkpoint_minutes=1e-9",
                     "train.max_steps=3")) == 0
    assert sorted(d.name for d in (run / "checkpoints").iterdir() if d.is_dir()) == [
        "step_0000001", "step_0000002", "step_0000003"]


@pytest.mark.multiproc
def test_a_save_that_fills_the_disk_is_one_line_and_the_run_resumes(tmp_path):
    """A file-size limit makes the write fail with EFBIG, as a full disk fails with ENOSPC:
    the same path (an OSError inside DCP's writer)."""
    run = tmp_path / "run"
    assert main(_cli(run, "train.max_steps=4")) == 0
    limit = (run / "checkpoints/step_0000004/__0_0.distcp").stat().st_size // 2

    def small_disk():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = _run_patched(run, "", "--resume", "auto", preexec=small_disk)
    assert res.returncode == EXIT_CONFIG
    err = res.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("pretrain: error: checkpoint of step 8 failed (")
    assert f"GiB free in {run / 'checkpoints'}" in err  # torch's writer drops the errno
    assert err.endswith(f"newest complete checkpoint: {run / 'checkpoints/step_0000004'}")
    assert main(_cli(run, "--resume", "auto")) == 0
    assert store.newest(run / "checkpoints").name == "step_0000008"


def test_resume_says_what_it_changes(tmp_path, capsys):
    """Resuming with other values says so: each config value that differs, the learning rate
    when the schedule is recomputed (train.max_steps raised), a finished run's "nothing to
    train", and `--resume auto` with no checkpoint starting at step 0."""
    run = tmp_path / "run"
    assert main(_cli(run, "--resume", "auto")) == 0
    assert f"resume: no complete checkpoint under {run / 'checkpoints'}: starting at step 0" \
        in capsys.readouterr().out
    assert main(_cli(run, "--resume", "auto")) == 0  # at train.max_steps 8 already
    out = capsys.readouterr().out
    assert "pretrain: nothing to train: the run is at step 8 of train.max_steps 8" in out
    assert "loss nan" not in out
    assert main(_cli(run, "train.max_steps=16", "model.loops=2", "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert ("resume: this run's config differs from the checkpoint's: model.loops 3 -> 2; "
            "train.max_steps 8 -> 16") in out
    line = next(x for x in out.splitlines() if "schedule is recomputed" in x)
    assert line.startswith("resume: the learning rate schedule is recomputed: lr at step 8 is ")


def test_status_says_finished_running_or_stopped_and_step_of_max(tmp_path, capsys):
    """`pretrain status` on a run: finished / stopped at step N of train.max_steps, running
    while a live process holds the run's lock (its record named)."""
    run = tmp_path / "run"
    assert main(_cli(run, "train.max_steps=4")) == 0
    capsys.readouterr()
    assert main(["status", str(run)]) == 0
    assert "state: finished (step 4 of 4)" in capsys.readouterr().out
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace(
        "max_steps: 4", "max_steps: 8"))
    assert main(["status", str(run)]) == 0
    assert "state: stopped (step 4 of 8; continue with --resume auto)" in capsys.readouterr().out
    lock = RunLock(run)
    lock.acquire()
    try:
        assert main(["status", str(run)]) == 0
        assert 'state: running (step 4 of 8; held by {"job": ' in capsys.readouterr().out
    finally:
        lock.release()
