"""Held-out loss of a model, per loop step and per exit rule: `pretrain eval` and the sweeps'
validation loss, on the run's validation data."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor
from tqdm import tqdm

from pretrain.config import Config
from pretrain.data import default_data, heldout_data
from pretrain.model.generate import ExitRule, readout_exit_steps, score
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import IGNORE_INDEX, compute_objective, per_step_ce, token_cross_entropy
from pretrain.text import TextCodec, bits_per_byte

EVAL_SEED_OFFSET = 1_000_003  # without validation data: training data in another order


def heldout_batches(cfg: Config, batches: int) -> tuple[list, str, bool]:
    """`batches` micro-batches of held-out data on one process, what that data is, and whether
    it is validation data: the run's `data.validation` (the first samples, in order), or --
    said plainly -- training data in another sample order (seed + EVAL_SEED_OFFSET)."""
    t = cfg.train
    held = heldout_data(cfg)
    if held is not None:
        out = held.rank_batches(batches * t.micro_batch_size * t.seq_len, t.micro_batch_size, 0, 1)
        n = min(batches * t.micro_batch_size, held.total)
        part = "all" if n == held.total else f"the first {n:,} of {held.total:,} sequences"
        more = "" if n == held.total else f" ({n / held.total:.1%}; --batches takes more)"
        return out, f"validation data ({', '.join(held.names)}): {part}{more}", True
    train = dataclasses.replace(t, seed=t.seed + EVAL_SEED_OFFSET, grad_accum_steps=1)
    it = default_data(dataclasses.replace(cfg, train=train)).batches()
    return [next(it) for _ in range(batches)], ("TRAINING data (no data.validation configured; "
                                                "another sample order than training)"), False


# the sums kept per exit rule of each group (`{kind}_{group}`): CE over tokens, CE over the
# tokens that stand for text (bits per byte), loops used
PER_RULE = ("ce", "nats", "loops")


def heldout_sums(ce: Tensor, labels: Tensor, n_bytes: Tensor,
                 exits: dict[str, list[tuple[Tensor, Tensor]]]) -> dict[str, Tensor]:
    """Sums over one micro-batch's held-out tokens, the one scorer of validation and `pretrain
    eval --data`: ce [R, S, B] per-token CE of every loop step, labels and n_bytes [S, B] (the
    bytes of text each target stands for: text.py), and per group of exits (readout: `exit`,
    decoded: `decoded`) one (CE at the exit [S, B], loops used [S, B]) per rule."""
    mask = (labels != IGNORE_INDEX).double()
    text = (n_bytes * mask > 0).double()  # EOS and padding stand for no text
    ce = ce.double()
    out = {"tokens": mask.sum(), "bytes": (n_bytes.double() * mask).sum(),
           "ce": (ce * mask).sum((1, 2)), "nats": (ce * text).sum((1, 2))}
    for group, per_rule in exits.items():
        weighted = {"ce": lambda c, u: c.double() * mask, "nats": lambda c, u: c.double() * text,
                    "loops": lambda c, u: u * mask}
        out |= {f"{kind}_{group}": _stack([weighted[kind](c, u).sum() for c, u in per_rule])
                for kind in PER_RULE}
    return out


def sum_shapes(loops: int, rules: int, groups: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """The shape of each of `heldout_sums`' entries (for ranks that hold none of them)."""
    shapes = {"tokens": (), "bytes": (), "ce": (loops,), "nats": (loops,)}
    for g in groups:
        shapes |= {f"{kind}_{g}": (rules,) for kind in PER_RULE}
    return shapes


def _stack(xs: list[Tensor]) -> Tensor:
    return torch.stack(xs) if xs else torch.zeros(0, dtype=torch.float64)


def readout_exits(ce: Tensor, gate_logits: Tensor, rules: tuple[ExitRule, ...],
                  logits: list[Tensor] | None = None) -> list[tuple[Tensor, Tensor]]:
    """(CE at the exit, loops used) per rule when every loop runs and the rule picks the step
    whose prediction counts (generate.py `readout_exit_steps`; kl rules read `logits`):
    validation's `ce_exit_*`."""
    steps = [readout_exit_steps(rule, gate_logits, logits=logits) for rule in rules]
    return [(ce.gather(0, s[None]).squeeze(0), s + 1) for s in steps]


def heldout_metrics(sums: dict[str, Tensor], rules: tuple[ExitRule, ...]) -> dict[str, float]:
    """Mean CE and bits per byte per loop step (`ce_step{t}`, `bpb_step{t}`, t from 1) and
    per exit rule of each group (`ce_exit_{rule}`, `bpb_exit_{rule}`, `loops_exit_{rule}`;
    `..._decoded_...` for decoding), from summed `heldout_sums`."""
    tokens, n_bytes = sums["tokens"].clamp_min(1), sums["bytes"].item()
    out = {"tokens": sums["tokens"].item(), "bytes": n_bytes}
    for t in range(sums["ce"].shape[0]):
        out[f"ce_step{t + 1}"] = (sums["ce"][t] / tokens).item()
        out[f"bpb_step{t + 1}"] = bits_per_byte(sums["nats"][t].item(), n_bytes)
    for group in [k[len("ce_"):] for k in sums if k.startswith("ce_")]:
        for j, rule in enumerate(rules):
            out[f"ce_{group}_{rule}"] = (sums[f"ce_{group}"][j] / tokens).item()
            out[f"bpb_{group}_{rule}"] = bits_per_byte(sums[f"nats_{group}"][j].item(), n_bytes)
            out[f"loops_{group}_{rule}"] = (sums[f"loops_{group}"][j] / tokens).item()
    return out


def scored_sums(objective, cross_entropy, rules: tuple[ExitRule, ...], codec: TextCodec):
    """A readout (LoopedOutput, labels [B, S]) -> `heldout_sums` with the readout exits, plus
    the objective summed over the tokens ("loss"): each step's per-token CE is computed once,
    by the objective, with `cross_entropy` (vocab-parallel under TP)."""
    def readout(out, labels: Tensor) -> dict[str, Tensor]:
        ces: list[Tensor] = []

        def recording(logits, target):
            ces.append(cross_entropy(logits, target))
            return ces[-1]

        result = objective(out, labels, recording)
        ce, target = torch.stack(ces), labels.t()
        sums = heldout_sums(ce, target, codec.bytes_of(target),
                            {"exit": readout_exits(ce, out.gate_logits, rules)})
        return {**sums, "loss": result.loss.double() * sums["tokens"]}
    return readout


@torch.no_grad()
def evaluate(cfg: Config, model: LoopedLM, batches: int) -> dict:
    """The objective and CE per loop step over `batches` micro-batches of held-out data
    (`heldout_batches`; "data" says which), token-weighted: the sweeps' validation loss."""
    model.eval()
    data, which, validation = heldout_batches(cfg, batches)
    readout = scored_sums(lambda out, labels, ce: compute_objective(cfg.objective, out, labels, ce),
                          token_cross_entropy, (), TextCodec.of(cfg.data.tokenizer))
    total: dict[str, Tensor] = {}
    for inputs, labels in data:
        sums = readout(model(inputs), labels)
        total = {k: total[k] + v for k, v in sums.items()} if total else sums
    scored = heldout_metrics({k: v for k, v in total.items() if k != "loss"}, ())
    steps = [scored[f"ce_step{t}"] for t in range(1, cfg.model.loops + 1)]
    return {"loss": (total["loss"] / total["tokens"].clamp_min(1)).item(), "ce_per_step": steps,
            "ce_final": steps[-1], "tokens": int(scored["tokens"]), "data": which,
            "validation": validation}


@torch.no_grad()
def exit_table(cfg: Config, model: LoopedLM, batches: int, rules: tuple[ExitRule, ...],
               policy: str = "full", prefill: int = 0) -> dict:
    """`heldout_metrics` of the tokens after the first `prefill` of each sequence: every loop
    step, each rule's readout exit (as validation's `ce_exit_*`) and each rule decoded exactly
    as `generate` decodes (model/generate.py `score`: early exit, the `policy` KV cache:
    `ce_decoded_*`), plus "data" (which data it measured) and "validation"."""
    model.eval()
    data, which, validation = heldout_batches(cfg, batches)
    codec = TextCodec.of(cfg.data.tokenizer)
    total: dict[str, Tensor] = {}
    # a bar on a terminal (every rule decodes each batch token by token: minutes at scale)
    for inputs, labels in tqdm(data, desc="eval", unit=" batches", disable=None, leave=False):
        target = labels[:, prefill:].t()
        out = model(inputs)
        ce = per_step_ce(out.logits, labels.t())[:, prefill:]  # [R, S', B]
        decoded = []
        for rule in rules:
            logits, used = score(model, inputs, prefill, cfg.model.loops, rule, policy)
            decoded.append((token_cross_entropy(logits[:, prefill:].transpose(0, 1), target),
                            used[:, prefill:].t()))
        sums = heldout_sums(ce, target, codec.bytes_of(target), {
            "exit": readout_exits(ce, out.gate_logits[:, prefill:], rules,
                                  [lg[prefill:] for lg in out.logits]),
            "decoded": decoded})
        total = {k: total[k] + v for k, v in sums.items()} if total else sums
    return {**heldout_metrics(total, rules), "data": which, "validation": validation}
