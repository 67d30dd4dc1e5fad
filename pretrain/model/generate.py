"""Decoding a looped LM: per-loop KV caches, early exit, and the cache policies Ouro studies.

Prefill runs every loop for every prompt token, so each loop's cache holds real keys/values
(what the released model does for every token). Each token's output is its exit step's logits.

Decoding: a new token stops looping at its exit step, chosen by an `ExitRule`:
  gate:q   the first step whose cumulative exit probability sum_{j<=t} p_j reaches q (Ouro's
           Q-exit; q >= 1 never exits early);
  delta:e  the first step t >= 2 with ||h_t - h_{t-1}||_2 < e (h the normed loop state: the
           hidden-state-change baseline of Ouro Fig. 5);
  kl:e     the first step whose next-token distribution is within KL e of the step before's,
           KL(p_{t-1} || p_t) < e, p_0's predecessor uniform (Huginn's adaptive compute,
           `generate_with_adaptive_compute` criterion "kl"; their default e = 5e-4);
  fixed:n  step n (a static exit); `all` runs every loop.
The last loop always stops. Huginn's "KV sharing" for tokens that exited early is the `full`
policy below (their `latest-m4` lookup: a later recurrence reads an exited token's keys of its
last step at the same layer). One difference: their coda keeps one cache, ours one per step.

KV cache policy while decoding (Ouro Table 14; prefill always keeps every loop's cache):
  full     one cache per loop step; a token that exited at step t leaves its step-t keys/values
           in the caches of the later steps (it is not recomputed).
  last     one cache: each token keeps only the keys/values of its exit (last run) step; every
           loop of a new token attends to it (1/R of the memory). (The FLT authors' engine also
           caches only the last loop, but its earlier loops then see the new tokens alone; that
           variant is not reproduced.)
  average  one cache: each token keeps the mean of its keys/values over the steps it ran.
After prefill, `last`/`average` collapse the per-loop caches the same way.

`score` runs held-out text through exactly this path (prefill of a prefix, then teacher-forced
decoding), so `pretrain eval` and `pretrain generate` agree token by token on the exit step.
`loops` may differ from training (test-time compute): p_R takes the remaining mass at that R.

Names: a token's *exit step* is the 0-based loop step whose prediction it takes; *loops used*
counts the loops it ran (exit step + 1, 1..R).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.looped import LoopedLM

KV = tuple[Tensor, Tensor]
KV_POLICIES = ("full", "last", "average")


@dataclass(frozen=True)
class ExitRule:
    kind: str  # gate | delta | fixed | all
    value: float = 1.0

    @classmethod
    def parse(cls, text: str) -> ExitRule:
        """'gate:0.9', 'delta:0.05', 'fixed:2' or 'all'; a ValueError names what is wrong."""
        kind, _, value = text.partition(":")
        if kind == "all" and not value:
            return cls("all")
        if kind not in ("gate", "delta", "kl", "fixed") or not value:
            raise ValueError(f"exit rule {text!r}: expected gate:Q, delta:EPS, kl:EPS, fixed:N "
                             "or all")
        try:
            v = float(value)
        except ValueError:
            raise ValueError(f"exit rule {text!r}: {value!r} is not a number") from None
        if kind == "fixed" and (v < 1 or v != int(v)):
            raise ValueError(f"exit rule {text!r}: the step must be a whole number >= 1")
        if v < 0:
            raise ValueError(f"exit rule {text!r}: must be >= 0")
        if kind == "gate" and v > 1:
            raise ValueError(f"exit rule {text!r}: Q is a probability, in [0, 1] (1: never early)")
        return cls(kind, v)

    def __str__(self) -> str:
        return self.kind if self.kind == "all" else f"{self.kind}:{self.value:g}"


class _ExitState:
    """Per-token bookkeeping of one rule over the loops of one chunk ([B, n] tensors)."""

    def __init__(self, rule: ExitRule, shape, device):
        self.rule = rule
        self.log_survive = torch.zeros(shape, device=device)
        self.cdf = torch.zeros(shape, device=device)
        self.log_probs: Tensor | None = None  # kl: the previous step's next-token log-probs

    def stops(self, t: int, loops: int, gate: Tensor, change: Tensor | None,
              logits: Tensor | None) -> Tensor:
        """Which tokens exit at step t (0-based) by the rule: gate [B, n]; change [B, n] the
        size of the step's hidden-state change ||h_t - h_{t-1}|| (None on the first step);
        logits [B, n, V] the step's (vocab-complete) logits."""
        r = self.rule
        if r.kind == "kl":
            log_p = F.log_softmax(logits.float(), -1)
            prev = self.log_probs
            if prev is None:  # Huginn starts from the uniform distribution
                prev = torch.full_like(log_p, -math.log(log_p.shape[-1]))
            self.log_probs = log_p
            return (F.kl_div(log_p, prev, reduction="none", log_target=True).sum(-1) < r.value) \
                | (t == loops - 1)
        if r.kind == "gate":
            g = gate.float()
            self.cdf = self.cdf + torch.exp(F.logsigmoid(g) + self.log_survive)
            self.log_survive = self.log_survive + F.logsigmoid(-g)
            stop = self.cdf >= r.value if r.value < 1 else torch.zeros_like(self.cdf, dtype=torch.bool)
        elif r.kind == "delta" and change is not None:
            stop = change < r.value
        elif r.kind == "fixed":
            stop = torch.full(gate.shape, t + 1 >= r.value, device=gate.device)
        else:
            stop = torch.zeros(gate.shape, dtype=torch.bool, device=gate.device)
        return stop | (t == loops - 1)


def hidden_change(h: Tensor, h_prev: Tensor | None) -> Tensor | None:
    """||h_t - h_{t-1}||_2 per token (the delta rule's measure), in fp32."""
    return None if h_prev is None else (h.float() - h_prev.float()).norm(dim=-1)


class LoopKVCache:
    """Keys/values per (segment, loop, layer) -- or, once `last`/`average` collapsed them, per
    (segment, layer) -- plus, for the chunk being decoded, what exited tokens leave behind.
    `real` [B, P]: False at the left padding of prompts shorter than the batch's longest."""

    def __init__(self, policy: str = "full", real: Tensor | None = None):
        if policy not in KV_POLICIES:
            raise ValueError(f"kv cache policy {policy!r}: expected one of {', '.join(KV_POLICIES)}")
        self.policy = policy
        self.kv: dict[tuple, KV] = {}
        self.length = 0
        self.collapsed = False
        self.exited: Tensor | None = None  # full: [B, n] over the current chunk
        self.frozen: dict[tuple[str, int], KV] = {}  # full: (segment, layer) -> chunk keys/values
        self.fresh: dict[tuple[str, int], list[KV]] = {}  # collapsed: the new token, per loop
        self.real = real  # [B, keys so far]: which keys are tokens, not padding

    def _key(self, segment: str, loop: int, layer: int) -> tuple:
        return (segment, layer) if self.collapsed and segment != "prelude" else (segment, loop, layer)

    def begin_chunk(self) -> None:
        self.exited, self.frozen, self.fresh = None, {}, {}

    def cover(self, n: int) -> None:
        """Extend the padding mask over the n new tokens of the next chunk (never padding)."""
        if self.real is not None and self.real.shape[1] < self.length + n:
            more = self.real.new_ones(self.real.shape[0], self.length + n - self.real.shape[1])
            self.real = torch.cat((self.real, more), 1)

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict:
        args: dict = {"past": self.kv.get(self._key(segment, loop, layer))}
        if self.real is not None:
            args["keys"] = self.real
        if self.exited is not None and (segment, layer) in self.frozen:
            args["frozen"] = (self.exited, *self.frozen[(segment, layer)])
        return args

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None:
        if self.collapsed and segment != "prelude":
            n = k.shape[2] - self.length
            self.fresh.setdefault((segment, layer), []).append((k[:, :, -n:], v[:, :, -n:]))
        else:
            self.kv[(segment, loop, layer)] = (k, v)

    def freeze(self, newly: Tensor, loop: int, n: int) -> None:
        """full: tokens in `newly` [B, n] exited on `loop`: keep that loop's keys/values."""
        keep = newly[:, None, :, None]
        for (segment, lp, layer), (k, v) in self.kv.items():
            if segment == "prelude" or lp != loop:
                continue
            nk, nv = k[:, :, -n:], v[:, :, -n:]
            if (segment, layer) in self.frozen:
                fk, fv = self.frozen[(segment, layer)]
                nk, nv = torch.where(keep, nk, fk), torch.where(keep, nv, fv)
            self.frozen[(segment, layer)] = (nk, nv)
        self.exited = newly if self.exited is None else self.exited | newly

    def fill_skipped(self, loop: int) -> None:
        """full: every token of the chunk exited before `loop`: extend that loop's cache."""
        for (segment, layer), (fk, fv) in self.frozen.items():
            past = self.kv.get((segment, loop, layer))
            if past is not None:
                fk, fv = torch.cat((past[0], fk), dim=2), torch.cat((past[1], fv), dim=2)
            self.kv[(segment, loop, layer)] = (fk, fv)

    def collapse(self, loops: int) -> None:
        """After prefill: `last` keeps the last loop's cache, `average` the mean over loops."""
        if self.policy == "full" or self.collapsed:
            return
        merged: dict[tuple, KV] = {}
        for (segment, loop, layer), (k, v) in list(self.kv.items()):
            if segment == "prelude":
                continue
            del self.kv[(segment, loop, layer)]
            if self.policy == "last" and loop != loops - 1:
                continue
            w = 1.0 if self.policy == "last" else 1.0 / loops
            mk, mv = merged.get((segment, layer), (0.0, 0.0))
            merged[(segment, layer)] = (mk + w * k, mv + w * v)
        self.kv.update(merged)
        self.collapsed = True

    def commit(self, exit_loop: Tensor) -> None:
        """collapsed: the decoded token finished at `exit_loop` [B] (0-based); append its exit
        step's keys/values (last) or their mean over the steps it ran (average)."""
        for key, steps in self.fresh.items():
            ks, vs = torch.stack([s[0] for s in steps]), torch.stack([s[1] for s in steps])
            ran = torch.arange(len(steps), device=ks.device)[:, None] <= exit_loop[None, :]  # [T, B]
            if self.policy == "last":
                ran = ran & (torch.arange(len(steps), device=ks.device)[:, None] == exit_loop[None])
            w = (ran.float() / ran.sum(0, keepdim=True))[:, :, None, None, None]
            k, v = (w * ks).sum(0).to(ks.dtype), (w * vs).sum(0).to(vs.dtype)
            past = self.kv.get(key)
            self.kv[key] = (k, v) if past is None else (torch.cat((past[0], k), 2),
                                                          torch.cat((past[1], v), 2))
        self.fresh = {}

    def bytes_per_token(self) -> float:
        total = sum(t.numel() * t.element_size() for kv in self.kv.values() for t in kv)
        return total / max(self.length, 1) / next(iter(self.kv.values()))[0].shape[0]


def forward_chunk(model: LoopedLM, ids: Tensor, cache: LoopKVCache, loops: int,
                  rule: ExitRule, prefill: bool = False, observe=None) -> tuple[Tensor, Tensor]:
    """Run new tokens ids [B, n] through the model against the cache.

    prefill: every token runs every loop (the exit step only picks its output).
    Otherwise tokens stop at their exit step; with a collapsed cache (last/average) tokens are
    decoded one at a time, since every loop of a token reads the finished cache of the others.
    `observe(t, logits [B, n, V], gate [B, n], change [B, n] | None)` sees every step run.
    Returns (logits of each token's exit step [B, n, V], loops used 1..loops [B, n])."""
    b, n = ids.shape
    if cache.length + n > model.cfg.max_seq_len:
        raise ValueError(f"sequence of {cache.length + n} tokens exceeds model.max_seq_len "
                         f"{model.cfg.max_seq_len}")
    if cache.collapsed and n > 1:
        outs = [forward_chunk(model, ids[:, j:j + 1], cache, loops, rule) for j in range(n)]
        return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)
    run = model.begin(ids, cache, loops, start=cache.length)
    cache.begin_chunk()
    cache.cover(n)
    e = model.embed_stream(ids, run)
    state = _ExitState(rule, (b, n), ids.device)
    decided = torch.zeros(b, n, dtype=torch.bool, device=ids.device)
    loops_used = torch.full((b, n), loops, dtype=torch.long, device=ids.device)
    out, handover, h_prev = None, None, None
    watch_change = rule.kind == "delta" or observe is not None  # the rule or the observer reads it
    for t in range(loops):
        if not prefill and decided.all():
            if not cache.collapsed:
                cache.fill_skipped(t)
            continue
        x, h_read = model.loop_input(t, e, handover, run)
        step = model.end_loop(t, model.run_block(t, x, h_read, run), run)
        handover = step.handover
        logits, gate = step.logits.transpose(0, 1), step.gate_logits.t()  # batch-first, like ids
        h_batch = model.loop_state(step).transpose(0, 1)
        change = hidden_change(h_batch, h_prev) if watch_change else None
        h_prev = h_batch
        if observe is not None:
            observe(t, logits, gate, change)
        stop = ~decided & state.stops(t, loops, gate, change, logits)
        out = logits if out is None else torch.where(stop[..., None], logits, out)
        loops_used[stop] = t + 1
        if not prefill and not cache.collapsed and t < loops - 1 and stop.any():
            cache.freeze(stop, t, n)
        decided |= stop
    if cache.collapsed:
        cache.commit(loops_used[:, 0] - 1)
    cache.length += n
    return out, loops_used


@torch.no_grad()
def score(model: LoopedLM, ids: Tensor, prefill: int, loops: int, rule: ExitRule,
          policy: str = "full", real: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Teacher-forced decoding of ids [B, S]: the first `prefill` tokens are prefilled, the rest
    decoded one after another (as `generate` would feed them); `real` as in `generate`. Returns
    (logits [B, S, V] of each token's exit step, loops used [B, S])."""
    cache = LoopKVCache(policy, real)
    parts = []
    if prefill:
        parts.append(forward_chunk(model, ids[:, :prefill], cache, loops, rule, prefill=True))
        cache.collapse(loops)
    if prefill < ids.shape[1]:
        parts.append(forward_chunk(model, ids[:, prefill:], cache, loops, rule))
    return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)


@dataclass
class Generation:
    tokens: Tensor  # [B, prompt + new]
    logits: Tensor  # [B, new, V]: the distribution each new token was chosen from
    loops_used: Tensor  # [B, decoded tokens]: loops each fed-in new token ran (its exit step + 1)
    mean_loops: float  # mean of loops_used (decoded tokens; the prompt runs every loop)
    cache_bytes_per_token: float  # keys/values kept per token and sequence at the end


def _choose(logits: Tensor, temperature: float, top_p: float, generator) -> Tensor:
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: LoopedLM,
    prompt: Tensor,
    max_new_tokens: int,
    loops: int | None = None,
    rule: ExitRule = ExitRule("all"),
    kv_cache: str = "full",
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    stop: Callable[[Tensor], bool] | None = None,
    real: Tensor | None = None,
) -> Generation:
    """Greedy (temperature 0) or top-p sampling. `use_cache=False` re-scores the whole sequence
    from scratch for every new token (`score`: the reference the incremental cache is tested
    against). `stop(new tokens [B, k])` is asked after each chosen token: True ends decoding
    there (stop strings and EOS: `TextCodec.stop_when`), so no loop runs past the answer.
    `real` [B, P] (False at left padding) decodes prompts of different lengths in one batch:
    no token attends to padding, and since RoPE scores depend only on the distance between
    positions, each prompt decodes as it would alone (up to rounding)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    loops = loops or model.cfg.loops
    was_training = model.training
    model.eval()
    cache = LoopKVCache(kv_cache, real)
    p = prompt.shape[1]
    logits, _ = forward_chunk(model, prompt, cache, loops, rule, prefill=True)
    cache.collapse(loops)
    tokens, steps, chosen = prompt, [], []
    for i in range(max_new_tokens):
        chosen.append(logits[:, -1])
        tokens = torch.cat((tokens, _choose(logits[:, -1], temperature, top_p, generator)[:, None]), 1)
        if i == max_new_tokens - 1 or (stop is not None and stop(tokens[:, p:])):
            break
        if use_cache:
            logits, step = forward_chunk(model, tokens[:, -1:], cache, loops, rule)
        else:
            logits, step = score(model, tokens, p, loops, rule, kv_cache, real)
            logits, step = logits[:, -1:], step[:, -1:]
        steps.append(step)
    model.train(was_training)
    used = torch.cat(steps, 1) if steps else torch.zeros(prompt.shape[0], 0, dtype=torch.long)
    mean = used.float().mean().item() if steps else float(loops)
    return Generation(tokens, torch.stack(chosen, 1), used, mean, cache.bytes_per_token())


def readout_exit_steps(rule: ExitRule, gate_logits: Tensor, changes: Tensor | None = None,
                       logits: list[Tensor] | None = None) -> Tensor:
    """The exit step (0-based) `rule` picks for each token when every loop has run (gate
    logits [R, ...] -> [...]): validation's readout during training and the harness's
    (pretrain/downstream). Decoding also changes what later tokens attend to -- `score`
    measures that. delta rules need `changes` [R, ...] (hidden_change of each step; step 0's
    is ignored); without them a delta rule never exits early. kl rules need every step's
    vocab-complete `logits` ([..., V] per step, laid out like the gate logits)."""
    loops = gate_logits.shape[0]
    if rule.kind == "kl" and logits is None:
        raise ValueError(f"exit rule {rule}: needs every step's logits (pretrain eval / generate)")
    state = _ExitState(rule, gate_logits.shape[1:], gate_logits.device)
    step = torch.full(gate_logits.shape[1:], loops - 1, device=gate_logits.device)
    done = torch.zeros(gate_logits.shape[1:], dtype=torch.bool, device=gate_logits.device)
    for t in range(loops):
        change = changes[t] if changes is not None and t > 0 else None
        step_logits = logits[t] if logits is not None else None
        stop = state.stops(t, loops, gate_logits[t], change, step_logits) & ~done
        step[stop] = t
        done |= stop
    return step
