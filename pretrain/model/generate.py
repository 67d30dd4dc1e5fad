"""Generation with a KV cache per loop step and Ouro-style adaptive early exit.

A token stops looping at the first step t where the exit CDF sum_{j<=t} p_j reaches the
threshold q (q >= 1 means "always run every loop"; the last loop always stops). Its output is
logits_t. On the later loops the token is not recomputed: the cache entries of those loops take
the keys/values it produced on its exit step, so later tokens still find it at every loop.
`loops` may differ from training (test-time compute): p_R then takes the remaining mass at the
requested R.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pretrain.model.looped import LoopedLM

KV = tuple[Tensor, Tensor]


class LoopKVCache:
    """Keys/values per (segment, loop, layer) plus, for the chunk being processed, the frozen
    keys/values of the tokens that already exited."""

    def __init__(self, inject: bool):
        self.inject = inject
        self.kv: dict[tuple[str, int, int], KV] = {}
        self.length = 0
        self.exited: Tensor | None = None  # [B, n] over the current chunk
        self.frozen: dict[tuple[str, int], KV] = {}  # (segment, layer) -> chunk keys/values

    def begin_chunk(self) -> None:
        self.exited, self.frozen = None, {}

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict:
        args: dict = {"past": self.kv.get((segment, loop, layer))}
        if self.inject and segment == "block" and loop > 0:
            args["inject"] = self.kv[("block", 0, layer)]
        if self.exited is not None and (segment, layer) in self.frozen:
            args["frozen"] = (self.exited, *self.frozen[(segment, layer)])
        return args

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None:
        self.kv[(segment, loop, layer)] = (k, v)

    def freeze(self, newly: Tensor, loop: int, n: int) -> None:
        """Tokens in `newly` [B, n] exited on `loop`: keep that loop's keys/values for them."""
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
        """Every token of the chunk exited before `loop`: extend that loop's cache, no compute."""
        for (segment, layer), (fk, fv) in self.frozen.items():
            past = self.kv.get((segment, loop, layer))
            if past is not None:
                fk, fv = torch.cat((past[0], fk), dim=2), torch.cat((past[1], fv), dim=2)
            self.kv[(segment, loop, layer)] = (fk, fv)


def forward_chunk(
    model: LoopedLM, ids: Tensor, cache: LoopKVCache, loops: int, exit_threshold: float
) -> tuple[Tensor, Tensor]:
    """Run new tokens ids [B, n] through the model against the cache.

    Returns (logits of each token's exit step [B, n, V], exit step 1..loops [B, n])."""
    b, n = ids.shape
    if cache.length + n > model.cfg.max_seq_len:
        raise ValueError(f"sequence of {cache.length + n} tokens exceeds model.max_seq_len "
                         f"{model.cfg.max_seq_len}")
    rope = model.rope(torch.arange(cache.length, cache.length + n, device=ids.device))
    cache.begin_chunk()
    h, _ = model.run_layers("prelude", 0, model.embed(ids.t()), rope, cache)
    signals = None
    active = torch.ones(b, n, dtype=torch.bool, device=ids.device)
    log_survive = torch.zeros(b, n, device=ids.device)
    cdf = torch.zeros(b, n, device=ids.device)
    exit_step = torch.full((b, n), loops, dtype=torch.long, device=ids.device)
    out = None
    for t in range(loops):
        if not active.any():
            cache.fill_skipped(t)
            continue
        h, signals = model.run_layers("block", t, h, rope, cache, signals)
        logits, gate = model.readout(h, t, rope, cache)
        logits, gate = logits.transpose(0, 1), gate.t()  # to batch-first, like ids
        if t == loops - 1:
            stop = active
        else:
            g = gate.float()
            cdf = cdf + torch.exp(F.logsigmoid(g) + log_survive)
            log_survive = log_survive + F.logsigmoid(-g)
            stop = active & (cdf >= exit_threshold) if exit_threshold < 1 else active & False
        out = logits if out is None else torch.where(stop[..., None], logits, out)
        exit_step[stop] = t + 1
        if t < loops - 1 and stop.any():
            cache.freeze(stop, t, n)
        active = active & ~stop
    cache.length += n
    return out, exit_step


@dataclass
class Generation:
    tokens: Tensor  # [B, prompt + new]
    logits: Tensor  # [B, new, V]: the distribution each new token was chosen from
    exit_steps: Tensor  # [B, processed tokens]: loop step at which each token exited
    loops_used: float  # mean of exit_steps


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
    exit_threshold: float = 1.0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Generation:
    """Greedy (temperature 0) or top-p sampling. `use_cache=False` recomputes the whole sequence
    for every new token (the reference the cache is tested against)."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    loops = loops or model.cfg.loops
    was_training = model.training
    model.eval()
    cache = LoopKVCache()
    tokens = prompt
    logits, steps = forward_chunk(model, prompt, cache, loops, exit_threshold)
    all_steps, chosen = [steps], []
    for i in range(max_new_tokens):
        chosen.append(logits[:, -1])
        nxt = _choose(logits[:, -1], temperature, top_p, generator)
        tokens = torch.cat((tokens, nxt[:, None]), dim=1)
        if i == max_new_tokens - 1:
            break
        if use_cache:
            logits, steps = forward_chunk(model, nxt[:, None], cache, loops, exit_threshold)
        else:
            cache = LoopKVCache()
            logits, steps = forward_chunk(model, tokens, cache, loops, exit_threshold)
            steps = steps[:, -1:]
        all_steps.append(steps)
    model.train(was_training)
    exit_steps = torch.cat(all_steps, dim=1)
    return Generation(tokens, torch.stack(chosen, 1), exit_steps, exit_steps.float().mean().item())
