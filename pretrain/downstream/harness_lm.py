"""Our looped model as an lm-evaluation-harness `LM`, at any loop count and exit rule.

lm-eval asks three things (lm_eval/api/model.py): loglikelihood(context, continuation),
loglikelihood_rolling(text) and generate_until(context, until). They are answered as its
Hugging Face causal-LM wrapper (the `hf` model type) answers them: the same split of context
and continuation into tokens (TemplateLM), EOS as the context of an empty one, the same left
truncation to the model's context, the same rolling windows, stop strings cut the same way --
so an exported model run through `hf` scores what this wrapper scores (tests/test_downstream.py).

The setting (`use(loops, rule)`) decides what a token's prediction is:
  loglikelihood  each scored token is read at its exit step, every loop running for every
                 token -- what the Ouro release's forward does with `exit_threshold` (the rule
                 picks the step; attention sees every step). The steps of loop t do not depend
                 on how many loops follow (p_R only takes the mass left at R), so one forward at
                 the largest loop count scores a request for every setting: each request is
                 run once and every setting reads its steps from `_steps`.
  generate_until greedy decoding by model/generate.py `generate` with early exit and the KV
                 cache policy, exactly as `pretrain generate --stop` decodes: decoding ends at
                 a stop string or EOS (what lm-eval's `hf` stops at). Requests are batched,
                 the shorter contexts left-padded (model/generate.py `real`): each decodes as
                 it would alone, up to rounding; the tally counts its own tokens only.
`loops_used` tallies the loops used (exit step + 1) per scored or generated token, per task.

Data parallel: with torch.distributed initialised every rank scores every world-th request
and one all_gather_object puts them back in order, so lm-eval -- which sees one process --
computes the same numbers on every rank as on one process.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from torch import Tensor

from core.config_schema import ConfigError
from pretrain.model.generate import ExitRule, LoopKVCache, forward_chunk, generate, readout_exit_steps
from pretrain.model.looped import LoopedLM
from pretrain.text import TextCodec

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (context ids, continuation ids)


@dataclass
class ScoredSteps:
    """Every loop step's view of one continuation's n tokens ([loops, n] each)."""

    logprob: Tensor
    greedy: Tensor  # the token is the step's argmax
    gate: Tensor  # exit gate logits
    change: Tensor  # ||h_t - h_{t-1}|| (step 0: 0)


class LoopedHarnessLM(TemplateLM):
    def __init__(self, model: LoopedLM, codec: TextCodec, max_loops: int, batch_size: int = 8,
                 kv_cache: str = "full"):
        super().__init__()
        self.model, self.codec, self.max_loops = model.eval(), codec, max_loops
        self.batch_size, self.kv_cache = batch_size, kv_cache
        self.loops, self.rule = max_loops, ExitRule("all")
        self._steps: dict[Pair, ScoredSteps] = {}
        self._tasks: list[str] | None = None  # the task of each request being scored
        self.loops_used: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.share = ((dist.get_rank(), dist.get_world_size()) if dist.is_initialized()
                      else (0, 1))

    def use(self, loops: int, rule: ExitRule) -> None:
        """Answer as the model run for `loops` loops with exit `rule`; restart the tally."""
        if not 1 <= loops <= self.max_loops:
            raise ValueError(f"loops {loops}: the wrapper scores up to {self.max_loops}")
        self.loops, self.rule = loops, rule
        self.loops_used.clear()

    @property
    def eot_token_id(self) -> int:
        return self.codec.eos_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.codec.encode(string)

    def tok_decode(self, ids) -> str:
        return self.codec.decode(ids)

    # -- loglikelihood ------------------------------------------------------------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._tasks = [r.task_name for r in requests]
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        pairs = [(tuple(ctx), tuple(cont)) for _, ctx, cont in requests]
        self._score([p for p in dict.fromkeys(pairs) if p not in self._steps])
        out = []
        tasks = self._tasks or ["" for _ in pairs]
        for pair, task in zip(pairs, tasks, strict=True):
            s = self._steps[pair]
            r = self.loops
            exit_step = readout_exit_steps(self.rule, s.gate[:r], s.change[:r])[None]  # [1, n]
            out.append((s.logprob.gather(0, exit_step).sum().item(),
                        bool(s.greedy.gather(0, exit_step).all())))
            tally = self.loops_used[task]
            tally[0] += (exit_step + 1).sum().item()
            tally[1] += exit_step.numel()
        self._tasks = None
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner, tasks = [], [], []
        for i, req in enumerate(requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(req.args[0]), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
                tasks.append(req.task_name)
        self._tasks = tasks
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        return totals

    def _score(self, pairs: list[Pair]) -> None:
        """Run this rank's share of `pairs` (longest first, batches right-padded: attention is
        causal, so padding after a sequence changes nothing in it) and gather every rank's."""
        rank, world = self.share
        mine = sorted(pairs[rank::world], key=lambda p: -len(p[0]) - len(p[1]))
        done: dict[Pair, ScoredSteps] = {}
        for b in range(0, len(mine), self.batch_size):
            done.update(self._score_batch(mine[b:b + self.batch_size]))
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, done)
            for part in parts:
                done.update(part)
        self._steps.update(done)

    @torch.no_grad()
    def _score_batch(self, pairs: list[Pair]) -> dict[Pair, ScoredSteps]:
        rows = [(ctx + cont)[-(self.max_length + 1):] for ctx, cont in pairs]
        width = max(len(r) for r in rows) - 1
        ids = torch.full((len(rows), width + 1), self.eot_token_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
        ids = ids.to(self.device)
        inputs, targets = ids[:, :-1], ids[:, 1:]
        steps: list[tuple[Tensor, ...]] = []

        def observe(t, logits, gate, change):
            logits = logits.float()
            lp = F.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
            steps.append((lp, logits.argmax(-1) == targets, gate.float(),
                          torch.zeros_like(lp) if change is None else change))

        forward_chunk(self.model, inputs, LoopKVCache("full"), self.max_loops, ExitRule("all"),
                      prefill=True, observe=observe)
        lp, greedy, gate, change = (torch.stack(x).cpu() for x in zip(*steps, strict=True))  # [T, B, S]
        out = {}
        for i, (pair, row) in enumerate(zip(pairs, rows, strict=True)):
            span = slice(max(len(row) - 1 - len(pair[1]), 0), len(row) - 1)
            out[pair] = ScoredSteps(lp[:, i, span], greedy[:, i, span], gate[:, i, span],
                                    change[:, i, span])
        return out

    # -- generation ---------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """This rank's share of the requests, in batches of one generation setting (longest
        contexts first, shorter ones left-padded), gathered from every rank."""
        rank, world = self.share
        groups: dict[tuple, list[tuple[int, list[int]]]] = defaultdict(list)
        for i in range(rank, len(requests), world):
            context, gen_kwargs = requests[i].args
            setting = _generation_setting(gen_kwargs, self.max_length, requests[i].task_name)
            groups[setting].append((i, self.tok_encode(context)))
        mine: dict[int, tuple[str, float, int]] = {}
        for (until, new), items in groups.items():
            items.sort(key=lambda item: -len(item[1]))
            for b in range(0, len(items), self.batch_size):
                mine.update(self._generate_batch(items[b:b + self.batch_size], list(until), new))
        if world > 1:
            parts: list = [None] * world
            dist.all_gather_object(parts, mine)
            mine = {k: v for part in parts for k, v in part.items()}
        texts = []
        for i, req in enumerate(requests):
            text, steps, tokens = mine[i]
            tally = self.loops_used[req.task_name]
            tally[0] += steps
            tally[1] += tokens
            texts.append(text)
        return texts

    def _generate_batch(self, items: list[tuple[int, list[int]]], until: list[str],
                        new: int) -> dict[int, tuple[str, float, int]]:
        """request -> (text up to its first stop string or EOS, summed loops used and number of
        the tokens it decoded until then, as if decoded alone)."""
        ctxs = [ids[-(self.max_length - new):] for _, ids in items]
        width = max(map(len, ctxs))
        prompt = torch.full((len(ctxs), width), self.eot_token_id, dtype=torch.long)
        real = torch.zeros(len(ctxs), width, dtype=torch.bool)
        for r, ctx in enumerate(ctxs):
            prompt[r, width - len(ctx):], real[r, width - len(ctx):] = torch.tensor(ctx), True
        gen = generate(self.model, prompt.to(self.device), new, loops=self.loops, rule=self.rule,
                       kv_cache=self.kv_cache, stop=self.codec.stop_when(until),
                       real=None if real.all() else real.to(self.device))
        out = {}
        for r, (i, _) in enumerate(items):
            ids = gen.tokens[r, width:].tolist()
            ids = ids[:self.codec.answer_length(ids, until)]
            steps = gen.loops_used[r, :len(ids) - 1]
            if self.eot_token_id in ids:
                ids = ids[:ids.index(self.eot_token_id)]
            text = self.tok_decode(ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            out[i] = (text, steps.sum().item(), steps.numel())
        return out


def _generation_setting(gen_kwargs: dict, max_length: int, task: str) -> tuple[tuple[str, ...], int]:
    """(stop strings, token budget) of lm-eval's generation kwargs; greedy decoding only, a
    budget that leaves the context at least one token of max_length (one line otherwise)."""
    kwargs = dict(gen_kwargs)
    until = kwargs.pop("until", None) or []
    until = [until] if isinstance(until, str) else list(until)
    if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
        raise ConfigError(f"task {task}: only greedy decoding (do_sample false, temperature 0) "
                          "is supported")
    new = kwargs.get("max_gen_toks", 256)
    if type(new) is not int or not 1 <= new < max_length:
        raise ConfigError(f"task {task}: max_gen_toks {new!r} must be a count from 1 to below "
                          f"the model's max_seq_len {max_length} (the context needs the rest)")
    return tuple(until), new
