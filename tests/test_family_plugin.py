"""A loop family defined in this file alone -- a gated residual handover -- equals its own
equations, trains under PP = 2 x TP = 2 with sequence parallelism, decodes and plans, with no
change anywhere else: what pretrain/model/families/base.py promises the author of a new family
(issue 35). Run as `torchrun -m tests.test_family_plugin --out F` it is its own multi-process
worker."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch
from torch import nn

from pretrain.model.families import LoopFamily, register

NAME = "test_gated_residual"
GATED = [f"model.loop_mode={NAME}"]


@register
class GatedResidual(LoopFamily):
    """x_1 = e, x_t = h_{t-1} + sigmoid(G h_{t-1}) * e with G a Linear H -> H without bias:
    later loops read the embedding stream, and G is the family's own module."""

    name = NAME
    reads_embedding = True

    def modules(self):
        h = self.cfg.hidden_size
        return {"residual_gate": nn.Linear(h, h, bias=False)}

    def loop_input(self, model, t, e, h, run):
        if t == 0:
            return e, None
        return h + torch.sigmoid(model.residual_gate(h)) * e, None

    def saved_first(self, w):
        return w.h  # e, read by every later loop's product

    def saved_per_loop(self, w, layers, first_layer, last):
        if not first_layer:
            return 0.0
        # the sigmoid's output (the product's other factor), and G's input h unless the
        # readout on this stage already keeps it
        return w.h + (0.0 if last else w.h)


def _restated(model, ids):
    """The family's forward written out: per-step logits [R] of [S, B, V]."""
    e = model.embed(ids.t())
    x, out = e, []
    pos = torch.arange(ids.shape[1])
    cos, sin = model.rope_cos[pos], model.rope_sin[pos]
    for _ in range(model.cfg.loops):
        for layer in model.block:
            x = layer(x, cos, sin)[0]
        h = model.norm(x)
        out.append(model.lm_head(h))
        x = h + torch.sigmoid(h @ model.residual_gate.weight.t()) * e  # the next loop's input
    return out


def _model(*overrides):
    from pretrain.model.looped import LoopedLM
    from tests.conftest import tiny_config

    cfg = tiny_config(*GATED, *overrides)
    torch.manual_seed(cfg.train.seed)
    return cfg, LoopedLM(cfg.model)


def test_family_equals_its_equations():
    cfg, model = _model("model.loops=3")
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = model(ids).logits, _restated(model, ids)
    assert "residual_gate.weight" in model.state_dict()
    for a, b in zip(got, want, strict=True):
        # the same operations in the same order: equal to the bit
        assert torch.equal(a, b)


def test_family_decodes_through_the_kv_cache():
    from tests.test_generate import assert_greedy_equals_recompute

    _, model = _model("model.loops=3")
    prompt = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(2))
    assert_greedy_equals_recompute(model.eval(), prompt, 6)


def test_family_plans_its_flops_parameters_and_memory():
    from pretrain.model.activations import saved_bytes
    from pretrain.model.flops import count_parameters, flops_per_token
    from pretrain.model.memory import MemoryPolicy, SavedForBackward
    from pretrain.model.objective import compute_objective
    from pretrain.planning.hardware import lookup
    from pretrain.planning.planner import plan
    from tests.conftest import tiny_config

    cfg, model = _model("model.loops=4", "train.seq_len=32")
    h = cfg.model.hidden_size
    ouro = tiny_config("model.loops=4", "train.seq_len=32")
    # G runs on every loop step: 2 H^2 forward FLOPs per token, 3x with backward
    extra = flops_per_token(cfg.model, 32) - flops_per_token(ouro.model, 32)
    assert extra == 3 * 4 * 2 * h * h
    params = count_parameters(cfg.model)
    assert params["recurrent"] - count_parameters(ouro.model)["recurrent"] == h * h
    ids = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(3))
    with SavedForBackward(model.parameters()) as c:
        compute_objective(cfg.objective, model(ids), ids)
    predicted = saved_bytes(cfg, 3, MemoryPolicy())
    # the activation model's own tolerance (tests/test_memory.py): 10%
    assert abs(predicted / c.bytes - 1) < 0.10, (predicted, c.bytes)
    estimates = plan(cfg, 8, lookup("h100"), 64)
    assert estimates and estimates[0].feasible


@pytest.mark.multiproc
def test_family_trains_under_pp2_tp2_sp(tmp_path):
    from tests.distributed import torchrun
    from tests.multiproc.compare import assert_family_run

    out = tmp_path / "results.json"
    torchrun(4, "-m", "tests.test_family_plugin", "--out", str(out))
    res = json.loads(out.read_text())
    assert_family_run(res, steps=3)
    assert len(res) == 4 and len(res[0]) == 3


def _worker() -> None:
    """Gradients of every stage's and TP rank's shard against the single process (the
    pipeline's own equivalence case, tests/multiproc/pp_equivalence.py, given this family),
    with and without a backprop window, and three optimizer steps of the trainer."""
    import tempfile

    import torch.distributed as dist

    from parallelism.topology import init_topology
    from tests.conftest import tiny_config
    from tests.multiproc import pp_equivalence as pp
    from tests.multiproc.compare import finish, trainer_losses

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    pp.VARIANTS[NAME] = pp.WINDOW_VARIANTS[NAME] = GATED
    topo = init_topology(tiny_config(*pp.SHAPES, "parallel.pipeline=2", "parallel.tensor=2",
                                     "train.grad_accum_steps=2"))
    results = {"R3": pp.one_case(topo, 3, 2, "1f1b", NAME, [2, 1], sp=True),
               "R3k2": pp.one_case(topo, 3, 2, "1f1b", NAME, [2, 1], sp=True, backprop=2)}
    base = [*pp.SHAPES, *GATED, "model.loops=3", "train.max_steps=3", "train.log_every=1",
            "optim.warmup_steps=0", "train.grad_accum_steps=2", "train.micro_batch_size=4",
            f"train.out_dir={tempfile.mkdtemp(prefix='family-train-')}"]
    results["train"] = trainer_losses(topo, base, ["parallel.pipeline=2", "parallel.tensor=2",
                                                   "parallel.sequence_parallel=true"])
    gathered = [None] * int(os.environ["WORLD_SIZE"])
    dist.all_gather_object(gathered, results)
    finish(topo, gathered, args.out)


if __name__ == "__main__":
    _worker()
