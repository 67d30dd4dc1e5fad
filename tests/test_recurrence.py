"""The `recurrence` section (pretrain/model/recurrence.py): loop growth with its lr re-warm,
resuming across a raise, and configs of the earlier form loading with a notice."""

from __future__ import annotations

import pytest

from pretrain.config import ConfigError, load_config
from pretrain.model.recurrence import Recurrence
from pretrain.optim import lr_at
from pretrain.train import Trainer, step_lr
from tests.conftest import ROOT, tiny_config

# R 1 for steps 0-1, 2 for steps 2-3, then model.loops 3; the lr re-warmed over 2 steps
GROW = ["model.loops=3", "recurrence.grow=[{until: 2, loops: 1}, {until: 4, loops: 2}]",
        "recurrence.rewarm_steps=2", "optim.warmup_steps=0", "train.max_steps=6",
        "train.log_every=1", "train.micro_batch_size=4", "objective.kind=last"]


def test_growth_runs_each_phases_depth_and_rewarms_the_lr():
    cfg = tiny_config(*GROW)
    rec = Recurrence.of(cfg)
    assert [rec.plan(cfg.train.seed, s, 0, 1).loops for s in range(6)] == [1, 1, 2, 2, 3, 3]
    assert rec.varies and [rec.lr_factor(s) for s in range(7)] == [1, 1, 0.5, 1, 0.5, 1, 1]
    assert [step_lr(cfg, s) for s in range(6)] == [
        lr_at(cfg.optim, s, 6) * f for s, f in enumerate([1, 1, 0.5, 1, 0.5, 1])]
    # FLOPs, the planner and memory read the phase's R; without a step, the final one
    assert rec.expected(step=0) == (1.0, 1.0) and rec.expected() == (3.0, 3.0)
    assert rec.window() == 3 and rec.window(step=3) == 2


def test_growth_trains_at_each_phases_depth_and_resumes_across_a_raise_exactly(tmp_path):
    """The per-step R, the lr actually set and the losses; a run resumed at step 3 (inside
    the second phase, across the first raise, mid re-warm of the second) gives the same."""
    def trainer(out, *extra):
        return Trainer(tiny_config(*GROW, "train.checkpoint_every=3", *extra, out_dir=out),
                       log=lambda _: None, tensorboard=False)

    full = trainer(tmp_path / "a").fit().history
    assert [h["train/loops"] for h in full] == [1, 1, 2, 2, 3, 3]
    cfg = tiny_config(*GROW)
    # the metrics travel as float32 (parallelism/stats.py): one rounding, 2^-24 relative
    assert [h["train/lr"] for h in full] == pytest.approx([step_lr(cfg, s) for s in range(6)],
                                                          rel=2 ** -24)
    resumed = trainer(tmp_path / "b")
    resumed.resume(str(tmp_path / "a/checkpoints/step_0000003"))
    again = resumed.fit().history
    for key in ("train/loss", "train/loops", "train/lr", "loop/ce_last"):
        assert [h[key] for h in again] == [h[key] for h in full[3:]], key


@pytest.mark.parametrize("grow,message", [
    ("[{until: 2, loops: 2}, {until: 2, loops: 2}]",
     "recurrence.grow[1]: phases raise R at later steps: until 2 after 2, loops 2 in 3.."),
    ("[{until: 0, loops: 1}]", "recurrence.grow[0]: phases raise R at later steps: until 0 after "
                               "0, loops 1 in 1.."),
    ("[{until: 5, loops: 3}]",
     "recurrence.grow: grows to model.loops 3: each phase's loops must be below it, got 3"),
    ("[{until: 5, depth: 2}]", "recurrence.grow[0].depth: unknown key"),
])
def test_a_bad_growth_schedule_is_one_line(grow, message):
    with pytest.raises(ConfigError) as e:
        tiny_config("model.loops=3", f"recurrence.grow={grow}")
    assert str(e.value) == message


def test_a_config_of_the_earlier_form_loads_as_the_new_keys_with_a_notice(tmp_path, capsys):
    old = tmp_path / "old.yaml"
    old.write_text((ROOT / "configs/tiny.yaml").read_text().replace(
        "  loops: 3                 # R\n",
        "  loops: 3\n  loops_sampler: poisson_lognormal\n  loops_sigma: 0.25\n").replace(
        "train:\n", "train:\n  backprop_loops: 2\n"))
    cfg = load_config(old, ["model.loops_per_sequence=false"])
    r = cfg.recurrence
    assert (r.sampler, r.sigma, r.backprop, r.per_sequence) == ("poisson_lognormal", 0.25, 2, False)
    assert capsys.readouterr().err == (
        f"notice: {old}: model.loops_sampler is now recurrence.sampler, model.loops_sigma is now "
        "recurrence.sigma, model.loops_per_sequence is now recurrence.per_sequence, "
        "train.backprop_loops is now recurrence.backprop (loaded as such; write the new keys)\n")
    assert load_config(old, ["recurrence.backprop=2"]).recurrence.backprop == 2
    with pytest.raises(ConfigError, match=r"^train.backprop_loops: is now recurrence.backprop, "
                                          r"which is also given \(a different value\)$"):
        load_config(old, ["recurrence.backprop=3"])
