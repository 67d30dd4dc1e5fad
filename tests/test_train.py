from __future__ import annotations

import json

import pytest
import torch

from pretrain.checkpoint.offline import load_model
from pretrain.config import OptimConfig
from pretrain.data import TokenWindows, default_data
from pretrain.optim import lr_at
from pretrain.train import Trainer, TrainingDiverged
from tests.conftest import tiny_config


class FixedBatch:
    """Always the same batch: for the overfitting test."""

    def __init__(self, inputs, labels):
        self.inputs, self.labels = inputs, labels

    def batches(self):
        while True:
            yield self.inputs, self.labels


def _trainer(tmp_path, *overrides, **kw):
    cfg = tiny_config("optim.warmup_steps=0", *overrides, out_dir=tmp_path)
    return Trainer(cfg, log=lambda _: None, **kw)


def test_overfits_one_batch(tmp_path):
    cfg = tiny_config("train.max_steps=300", "train.log_every=10", "optim.warmup_steps=10",
                      "optim.weight_decay=0.0", "train.micro_batch_size=4", out_dir=tmp_path)
    rows = torch.randint(0, 256, (4, 65), generator=torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, data=FixedBatch(rows[:, :-1], rows[:, 1:]), log=lambda _: None,
                      tensorboard=False)
    summary = trainer.fit(save=False)
    loops = range(1, cfg.model.loops + 1)
    reached = [s for s in summary.history
               if s["train/loss"] < 0.1 and max(s[f"loop/ce_step{t}"] for t in loops) < 0.1]
    assert reached, f"final loss {summary.final_loss:.3f}"
    assert reached[0]["step"] <= 300


def _capture_grads(trainer):
    """Record the gradients the optimizer is about to apply."""
    seen, step = [], trainer.optimizer.step

    def wrapped(*a, **k):
        seen.append([p.grad.clone() for p in trainer.model.parameters() if p.requires_grad])
        return step(*a, **k)

    trainer.optimizer.step = wrapped
    return seen


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    big = _trainer(tmp_path / "a", "train.micro_batch_size=8", "train.max_steps=2",
                   tensorboard=False)
    acc = _trainer(tmp_path / "b", "train.micro_batch_size=4", "train.grad_accum_steps=2",
                   "train.max_steps=2", tensorboard=False)
    grads_big, grads_acc = _capture_grads(big), _capture_grads(acc)
    for _ in range(2):
        la = big.train_step().loss
        lb = acc.train_step().loss
        assert la.item() == pytest.approx(lb.item(), rel=1e-5)
    for step_big, step_acc in zip(grads_big, grads_acc, strict=True):
        for gb, ga in zip(step_big, step_acc, strict=True):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_same_seed_same_run_bit_identical(tmp_path):
    runs = [_trainer(tmp_path / str(i), "train.max_steps=6", "train.log_every=1",
                     tensorboard=False).fit(save=False) for i in range(2)]
    assert [s["train/loss"] for s in runs[0].history] == [s["train/loss"] for s in runs[1].history]
    other = _trainer(tmp_path / "x", "train.max_steps=6", "train.log_every=1", "train.seed=7",
                     tensorboard=False).fit(save=False)
    assert [s["train/loss"] for s in other.history] != [s["train/loss"] for s in runs[0].history]


def test_non_finite_step_is_skipped_and_counted(tmp_path):
    trainer = _trainer(tmp_path, "train.max_steps=4", "train.max_bad_steps=2", tensorboard=False)
    trainer.train_step()
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real = trainer.model.forward
    poisoned = {"left": 1}

    def forward(ids, **kw):
        out = real(ids, **kw)
        if poisoned["left"]:
            poisoned["left"] -= 1
            out.logits[-1] = out.logits[-1] * float("nan")
        return out

    trainer.model.forward = forward
    ok = trainer.train_step().ok
    assert not ok and trainer.skipped == 1
    for a, b in zip(before, trainer.model.parameters(), strict=True):
        assert torch.equal(a, b)
    ok = trainer.train_step().ok
    assert ok and trainer.bad_streak == 0
    poisoned["left"] = 10
    trainer.train_step()
    with pytest.raises(TrainingDiverged, match="train.max_bad_steps"):
        trainer.train_step()


def test_adaptive_gate_stage_trains_only_the_gate(tmp_path):
    trainer = _trainer(tmp_path, "objective.kind=adaptive_gate", "train.max_steps=3",
                       tensorboard=False)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit(save=False)
    for name, p in trainer.model.named_parameters():
        assert torch.equal(before[name], p) != name.startswith("gate."), name


def test_lr_schedules():
    cos = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(cos, 0, 100) == pytest.approx(0.1)
    assert lr_at(cos, 9, 100) == pytest.approx(1.0)
    assert lr_at(cos, 99, 100) == pytest.approx(0.1)
    assert lr_at(cos, 55, 101) == pytest.approx(0.55, abs=1e-9)
    wsd = OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert [lr_at(wsd, s, 100) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_at(wsd, 89, 100) == pytest.approx(0.5)
    assert lr_at(wsd, 99, 100) == pytest.approx(0.0)


def test_fit_writes_tensorboard_and_a_loadable_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _trainer(tmp_path, "train.max_steps=4", "train.log_every=2")
    summary = trainer.fit()
    events = EventAccumulator(str(summary.tensorboard_dir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    loops = trainer.cfg.model.loops
    want = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s",
            "train/expected_loops", "train/skipped_steps"}
    want |= {f"loop/{k}_step{t}" for k in ("ce", "exit_prob", "gate", "hidden_norm")
             for t in range(1, loops + 1)}
    want |= {f"grad_norm/block_layer{i}" for i in range(trainer.cfg.model.num_layers)}
    assert want <= tags
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]
    # the FLT paper's diagnostics, also in metrics.jsonl: |x_t| per loop, grad norm per layer,
    # the latter summing (in squares) to the total when the gate, norms and embedding are added
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[-1]) == want | {"step", "time", "train/mfu", "train/peak_memory_gb",
                                    "train/gate_entropy", "data/skipped_samples"}
    assert min(rows[-1][f"loop/hidden_norm_step{t}"] for t in range(1, loops + 1)) > 0
    per_layer = [rows[-1][f"grad_norm/block_layer{i}"] for i in range(trainer.cfg.model.num_layers)]
    assert min(per_layer) > 0
    assert sum(g * g for g in per_layer) < rows[-1]["train/grad_norm"] ** 2
    cfg, model = load_model(summary.checkpoint)
    ids = torch.randint(0, 256, (1, 16))
    trainer.model.eval()
    torch.testing.assert_close(model(ids).logits[-1], trainer.model(ids).logits[-1])


def test_data_order_depends_only_on_seed_and_index():
    tokens = torch.arange(1000)
    a, b = TokenWindows(tokens, 16, seed=1), TokenWindows(tokens, 16, seed=1)
    x1, _ = a.batch(0, 8)
    x2, _ = a.batch(8, 8)
    both, _ = b.batch(0, 16)
    assert torch.equal(torch.cat((x1, x2)), both)
    epoch = torch.stack([a.sample(i)[0] for i in range(a.num_windows)])
    assert sorted(epoch.tolist()) == [16 * k for k in range(a.num_windows)]
    assert not torch.equal(TokenWindows(tokens, 16, seed=2).batch(0, 8)[0], x1)


MUON = ["optim.name=muon", "optim.muon_lr=0.02", "optim.embedding_lr=0.01", "optim.head_lr=0.001",
        "optim.weight_decay=0.0", "train.max_steps=6", "train.log_every=3",
        "optim.warmup_steps=0", "optim.schedule=constant"]


def test_muon_orthogonalises_each_fused_block_and_adamw_the_rest(tmp_path):
    """optim.name=muon: one step of torch.optim.Muon on each block of q|k|v (and gate|up) as a
    separate matrix equals the fused weight's update; AdamW updates embedding, head and norms
    with their own peak lrs; the state checkpoints like the weight and resumes bit-exactly."""
    import copy

    from pretrain.optim import MuonAdamW

    cfg = tiny_config(*MUON, out_dir=tmp_path / "a")
    trainer = Trainer(cfg, log=lambda _: None, tensorboard=False)
    assert isinstance(trainer.optimizer, MuonAdamW)
    before = copy.deepcopy(trainer.model.state_dict())
    trainer.train_step()
    w = "block.0.attn.qkv_proj.weight"
    qkv = dict(trainer.model.named_parameters())[w]
    # the reference: torch's Muon on the q, k and v blocks as three parameters, same gradient
    ref_params = [torch.nn.Parameter(b.clone()) for b in before[w].split(list(
        trainer.model.block[0].attn.qkv_proj.parts))]
    # the gradient of this step: recompute it on a copy of the starting model
    from pretrain.model.looped import LoopedLM
    from pretrain.model.objective import compute_objective

    ref_model = LoopedLM(cfg.model)
    ref_model.load_state_dict(before)
    inputs, labels = next(default_data(cfg).batches())
    loss = compute_objective(cfg.objective, ref_model(inputs), labels).loss
    loss.backward()
    g = dict(ref_model.named_parameters())[w].grad
    norm = torch.nn.utils.get_total_norm([p.grad for p in ref_model.parameters()
                                          if p.grad is not None])
    g = g * min(1.0, cfg.optim.grad_clip / (norm.item() + 1e-6))
    for p, gb in zip(ref_params, g.split(list(trainer.model.block[0].attn.qkv_proj.parts)),
                     strict=True):
        p.grad = gb.clone()
    torch.optim.Muon(ref_params, lr=0.02, weight_decay=0.0, momentum=0.95).step()
    torch.testing.assert_close(qkv.detach(), torch.cat([p.detach() for p in ref_params]),
                               rtol=1e-4, atol=1e-6)
    lrs = {g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {cfg.optim.lr, 0.02, 0.01, 0.001}
    # resume: 6 steps straight == 3 steps, checkpoint, 3 more
    straight = Trainer(tiny_config(*MUON, out_dir=tmp_path / "s"), log=lambda _: None,
                       tensorboard=False).fit(save=False)
    first = Trainer(tiny_config(*MUON, "train.max_steps=3", out_dir=tmp_path / "r"),
                    log=lambda _: None, tensorboard=False)
    first.fit()
    second = Trainer(tiny_config(*MUON, out_dir=tmp_path / "r"), log=lambda _: None,
                     tensorboard=False)
    second.resume("auto")
    rest = second.fit(save=False)
    assert [s["train/loss"] for s in straight.history][1:] == [s["train/loss"] for s in rest.history]

