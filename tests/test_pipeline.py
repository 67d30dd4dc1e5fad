"""The circular pipeline (PP = 2, and PP = 2 x TP = 2 with sequence parallelism) against the
single-process model, plus its schedules, balancing and layout errors."""

from __future__ import annotations

import json

import pytest

from parallelism.pipeline_balance import auto_split
from parallelism.pipeline_messages import Action, Ring
from parallelism.pipeline_schedule import Piece, peak_live, schedule, warmup_count
from pretrain.cli import main
from pretrain.model.flops import stage_cost_model
from tests.conftest import ROOT, tiny_config
from tests.distributed import torchrun
from tests.multiproc.pp_equivalence import cases, window_cases


@pytest.fixture(scope="module", params=[1, 2], ids=["pp2", "pp2xtp2"])
def results(request, tmp_path_factory):
    tp = request.param
    out = tmp_path_factory.mktemp("pp") / "results.json"
    torchrun(2 * tp, "-m", "tests.multiproc.pp_equivalence", "--tp", str(tp), "--out", str(out))
    return tp, json.loads(out.read_text())


@pytest.mark.multiproc
def test_gradients_and_loss_equal_single_process(results):
    """Every case (Ouro: R in {1,2,4}, m in {1,2,4,8}, 1F1B and GPipe, splits [2,1] and [1,2];
    lt_i, lt_ia, FLT with its recipe, flt_res at R = 3; truncated backprop -- R = 3, k = 1 and
    R = 4, k = 2 -- for ouro, FLT and huginn from seeded random states) on every rank: each
    parameter's gradient and the loss match."""
    tp, ranks = results
    checked = 0
    for rank, res in enumerate(ranks):
        for case, r in res.items():
            if case.startswith("train") or "config_error" in r:
                continue
            assert r["grad_close"], f"rank {rank} {case}: {r['grad_param']} {r['grad']}"
            if "loss" in r:
                assert r["loss"] < 1e-5, f"rank {rank} {case}"
            checked += 1
    errors = sum(1 for r in ranks[0].values() if "config_error" in r)
    assert checked == len(ranks) * (len(cases(tp)) + len(window_cases(tp)) - errors) > 0


@pytest.mark.multiproc
def test_ring_bytes_per_loop_mode(results):
    """What crosses the ring, counted. Per microbatch, stage 0 sends x on every lap -- with
    h_t-1 too on laps > 1 for flt / flt_res, whose every layer reads it -- and the gradients of
    the states h_t it received at lap boundaries inside the backprop window (all R - 1 without
    one); the last stage sends the R - 1 states and the gradients of what stage 0 sent inside
    the window. Messages of [S/tp or S, B=2, H=64] fp32."""
    tp, ranks = results
    message = (16 // tp) * 2 * 64 * 4  # rows (sequence-parallel under TP) x batch x hidden x fp32
    checked = 0
    for case, r in ranks[0].items():
        if case.startswith("train") or "config_error" in r:
            continue
        r_, m_, _, variant, _ = case.split("-")
        loops, _, k = r_[1:].partition("k")
        loops, m = int(loops), int(m_[1:])
        k = int(k or loops)
        reads_h = variant.startswith("flt")  # every layer reads h_t-1 on laps > 0

        def in_lap(laps, reads_h=reads_h):  # stage 0 -> 1 messages over these laps
            return sum(1 + (reads_h and lap > 0) for lap in laps)

        first = in_lap(range(loops)) + k - 1
        last = loops - 1 + in_lap(range(loops - k, loops))
        assert ranks[0][case]["sent_bytes"] == m * first * message, case
        assert ranks[-1][case]["sent_bytes"] == m * last * message, case
        checked += 1
    assert checked > 0


@pytest.mark.multiproc
def test_1f1b_memory_bound_and_gpipe_growth(results):
    _, ranks = results
    for res in ranks:
        for case, r in res.items():
            if case.startswith("train") or "config_error" in r:
                continue
            assert r["peak_live"] == r["planned_peak"]
            if "-1f1b-" in case:
                assert r["peak_live"] <= r["bound"], case
    gpipe = {c: r["peak_live"] for c, r in ranks[0].items() if "-gpipe-ouro-21" in c}
    assert gpipe["R2-m4-gpipe-ouro-21"] > gpipe["R2-m2-gpipe-ouro-21"] > 0  # grows with m


@pytest.mark.multiproc
def test_incompatible_microbatches_are_rejected(results):
    tp, ranks = results
    errors = {c: r["config_error"] for c, r in ranks[0].items() if "config_error" in r}
    if tp > 1:  # that run uses m in {2, 4} only
        assert not errors
        return
    assert sorted(errors) == sorted(f"R{r}-m1-1f1b-ouro-{s}" for r in (2, 4) for s in ("21", "12"))
    for err in errors.values():
        assert err.startswith("train.grad_accum_steps: 1 microbatches do not fit the interleaved")


@pytest.mark.multiproc
def test_ten_optimizer_steps_reproduce_the_loss_curve(results):
    _, ranks = results
    for loops in (1, 3):
        r = ranks[0][f"train-R{loops}"]
        assert len(r["losses_par"]) == 10
        for a, b in zip(r["losses_par"], r["losses_ref"], strict=True):
            # losses are means over every token: the stages' fp32 rounding (compare.py) stays
            # ~1e-7 relative; a weight AdamW moved differently has a ~zero gradient
            assert a == pytest.approx(b, rel=1e-5)


def test_schedule_structure():
    for rank in (0, 1):
        for loops, m in ((1, 4), (2, 4), (4, 8)):
            pieces = schedule("1f1b", 2, loops, m, rank)
            fwd = [p for p in pieces if p.kind == "F"]
            bwd = [p for p in pieces if p.kind == "B"]
            assert sorted(fwd) == sorted(Piece("F", i, t) for i in range(m) for t in range(loops))
            assert len(bwd) == len(fwd)
            for p in bwd:  # a microbatch's laps go backward in reverse order, after its forward
                assert pieces.index(Piece("F", p.mb, p.lap)) < pieces.index(p)
                if p.lap + 1 < loops:
                    assert pieces.index(Piece("B", p.mb, p.lap + 1)) < pieces.index(p)
            assert peak_live(pieces) <= warmup_count(2, loops, m, rank) + 1
            assert peak_live(schedule("gpipe", 2, loops, m, rank)) == m * loops


def test_auto_split_is_loop_aware():
    """The last stage pays R x (LM head + gate): auto gives it fewer layers, more so for a
    bigger vocabulary, and never does worse than the even split."""
    cfg = tiny_config("model.num_layers=8", "model.vocab_size=32000", "model.loops=4",
                      "parallel.pipeline=2", "train.grad_accum_steps=2")
    costs = stage_cost_model(cfg)
    split = auto_split(costs, 8, 2)
    assert sum(split) == 8 and split[1] < split[0]
    assert max(costs.of(split)) <= max(costs.of([4, 4]))
    small = tiny_config("model.num_layers=8", "model.vocab_size=260", "model.loops=4",
                        "parallel.pipeline=2", "train.grad_accum_steps=2")
    assert auto_split(stage_cost_model(small), 8, 2) == [4, 4]


BAD = [
    (["parallel.pipeline=4", "model.num_layers=2"],
     "parallel.pipeline: 4 stages need at least as many shared layers, got 2"),
    (["parallel.pipeline=2", "parallel.pipeline_split=[2,1]", "train.grad_accum_steps=2"],
     "parallel.pipeline_split: [2, 1] must be 2 positive layer counts summing to "
     "model.num_layers 2"),
    (["parallel.pipeline=2", "parallel.pipeline_split=[2,0]", "model.num_layers=2",
      "train.grad_accum_steps=2"],
     "parallel.pipeline_split: [2, 0] must be 2 positive layer counts summing to "
     "model.num_layers 2"),
    (["parallel.pipeline=2", "train.grad_accum_steps=3"],
     "train.grad_accum_steps: 3 microbatches do not fit the interleaved 1F1B schedule over 3 "
     "laps: need a multiple of parallel.pipeline 2 (or parallel.pipeline_schedule=gpipe)"),
    (["parallel.pipeline_split=[1,1]"], "parallel.pipeline_split: needs parallel.pipeline > 1"),
]


@pytest.mark.parametrize("overrides,message", BAD)
def test_bad_pipeline_layouts(overrides, message, capsys, tmp_path):
    assert main(["train", "--config", str(ROOT / "configs/tiny.yaml"),
                 f"train.out_dir={tmp_path}", *overrides]) == 2
    assert capsys.readouterr().err == f"pretrain: error: {message}\n"


def _step_pieces(kind, stages, loops, grad_from, m, rank):
    """A training step's pieces on `rank` as PipelineStage.run builds them."""
    ahead = [Piece("F", mb, lap) for lap in range(grad_from) for mb in range(m)]
    return ahead + [Piece(p.kind, p.mb, p.lap + grad_from)
                    for p in schedule(kind, stages, loops - grad_from, m, rank)]


def _issue_order_violations(ring, actions):
    """Replays `actions` the way NCCL pairs point-to-point messages: per pair of ranks, the
    n-th operation one end issues meets the n-th the other end issues. Returns what went
    wrong: a send met by a send, a receive given another piece's message, a message never
    received, or a piece run before its message's receive was posted."""
    sender = {ring.sends_to(r, p): r for r, acts in enumerate(actions) for kind, p in acts
              if kind == "run"}
    ops = {}  # (rank, peer) -> [(direction, message)] in rank's issue order
    wrong = []
    for rank, acts in enumerate(actions):
        posted = set()
        for kind, piece in acts:
            if kind == "recv":
                posted.add(piece)
                ops.setdefault((rank, sender[rank, piece]), []).append(("recv", (rank, piece)))
                continue
            if ring.receives(rank, piece) and piece not in posted:
                wrong.append(f"rank {rank} runs {piece} before posting its receive")
            dest = ring.sends_to(rank, piece)
            if dest is not None:
                ops.setdefault((rank, dest[0]), []).append(("send", dest))
    for (a, b), mine in ops.items():
        theirs = ops.get((b, a), [])
        if len(mine) != len(theirs):
            wrong.append(f"ranks {a}, {b}: {len(mine)} operations against {len(theirs)}")
        for (da, ma), (db, mb) in zip(mine, theirs, strict=False):
            if da == db or ma != mb:
                wrong.append(f"ranks {a}, {b}: {da} {ma} meets {db} {mb}")
                break
    return wrong


@pytest.mark.parametrize("kind", ["1f1b", "gpipe"])
def test_ring_messages_pair_by_issue_order(kind):
    """NCCL ignores p2p tags and pairs each pair of ranks' operations by issue order: every
    schedule, PP 2-4, R 1-4, every backprop window and microbatch count issues each pair's
    sends and receives in the same order at both ends (both directions of a pair share one
    NCCL stream, so a mismatch hangs or pairs the wrong tensors). The multi-process
    equivalence tests run the same order on gloo with every tag 0."""
    checked = 0
    for stages in (2, 3, 4):
        for loops in (1, 2, 3, 4):
            for grad_from in range(loops):
                for m in (1, 2, stages, 2 * stages):
                    if loops - grad_from > 1 and m % stages and m > stages:
                        continue
                    ring = Ring(stages, loops, grad_from)
                    pieces = [_step_pieces(kind, stages, loops, grad_from, m, r)
                              for r in range(stages)]
                    assert _issue_order_violations(ring, ring.actions(pieces)) == []
                    checked += 1
    assert checked > 100


def test_ring_order_check_catches_receives_posted_in_own_order():
    """The check above can fail: posting each rank's receives in its own piece order (what a
    tag-matched ring may do) mispairs PP = 2 1F1B's two directions of one pair."""
    ring, m = Ring(2, 2, 0), 2
    pieces = [_step_pieces("1f1b", 2, 2, 0, m, r) for r in range(2)]
    own = [[a for p in ps for a in ([Action("recv", p)] if ring.receives(r, p) else [])
            + [Action("run", p)]] for r, ps in enumerate(pieces)]
    assert _issue_order_violations(ring, own)
