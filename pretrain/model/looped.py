"""The looped language model: one shared block of N decoder layers applied R times.

With e = Prelude(Embed(ids)) (no prelude layers by default), N the final RMSNorm and nu a
weightless RMSNorm, loop step t = 1..R runs

    x_t = LoopInput_t(e, h_{t-1})             (model.loop_mode, below)
    x_t = Block(x_t)                          (the same weights every loop)
    h_t = N(x_t)                              (the state handed to the next loop)
    (`model.norm_between_loops: false`, an ablation of ouro mode: x_t itself is handed over)
    logits_t = LMHead(h_t),  lambda_t = sigmoid(w . h_t + b)      (exit gate, per token)

(with coda layers the readout is N(Coda(h_t)); logits are soft-capped when
`model.logit_softcap` c > 0: c tanh(logits / c)). `model.residual_scale` lambda > 0 scales
every residual branch of the block, x + epsilon f(x) with epsilon = lambda / (R sqrt(N_layers))
at the configured R (arXiv 2606.18524; an option, in no released model). `objective.py` turns
the per-step logits and gates into the training loss.

Loop families -- how loop t hands over to loop t + 1 (`model.loop_mode`) -- live one per
module in pretrain/model/families/ (base.py: what a family decides): ouro (the released Ouro
model), lt, lt_i, lt_ia, flt, flt_res (the Fully Looped Transformer paper's) and huginn
(Huginn-0125's recurrence from a random state). The model asks its family (`self.family`) for
the loop input, each block layer's input and the handover, and sets the family's extra modules
(`loop_modules`) on itself under their names. The FLT paper has no exit gate: its configs train
the CE of the last / every / the last third of the loops (`objective.kind`), and the gate is
left untrained.

What training keeps for backward (activation recompute, a deferred chunked readout) is the
`MemoryPolicy` set by `set_memory` (model/memory.py); it changes no value.

One loop step is three methods, called in this order by every driver (training's `forward`,
the circular pipeline, decoding): `loop_input` (x_t from e and what step t - 1 handed over),
`run_block` (this module's slice of the block) and `end_loop` (norm, readout or none, handover).
The equations count steps from 1 as the papers do; code counts them from 0 (metric names
from 1: `loop/ce_step1` is t = 0).

Truncated backprop (`recurrence.backprop` k, model/recurrence.py): loop steps before the
last k run without building a graph (`LoopPass.grad_from`); their readouts still enter the loss
value, as constants.

The model holds no process-group logic. `layer_offset` is the index of `block[0]` in the whole
shared block: the circular pipeline keeps a slice of the layers on each stage, and a family's
layer input may depend on the layer (lt_ia: the first). `seq_shard` (index, count) is the slice
of the sequence the stream between layers holds (sequence parallelism): an initial state drawn
for the whole sequence is cut to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from core.model_interface import KVStore, NoKV, Rope
from pretrain.model.config import ModelConfig
from pretrain.model.families import family_class
from pretrain.model.layers import Attention, DecoderLayer, RMSNorm, rope_tables, trunc_orthogonal_
from pretrain.model.memory import DeferredLogits, MemoryPolicy, plain, recomputed
from pretrain.model.recurrence import active_steps


@dataclass
class LoopPass:
    """What the loop steps of one forward share (`LoopedLM.begin`)."""

    rope: Rope  # cos, sin of the positions
    ids: Tensor  # the tokens [B, S] (value embeddings read them)
    store: KVStore  # training: NoKV; decoding: the KV cache
    loops: int  # R of this forward (may differ from model.loops: test-time compute)
    read_steps: range  # the loop steps (0-based) whose logits and gate are computed
    tokens: tuple[int, int]  # (S, B): the shape of one step's gate logits
    state: Tensor | None = None  # an initial state x_0 [S, B, H], the whole sequence (None: drawn)
    # seeds the draw of x_0: one for the batch, or one per sample (None: torch's default generator)
    state_seed: int | tuple[int, ...] | None = None
    grad_from: int = 0  # loop steps before this one build no graph (truncated backprop)
    # [R, B]: which samples update their state on each loop step (None: all; a depth drawn
    # per sequence, model/recurrence.py `active_steps`)
    active: Tensor | None = None
    # what the loop steps of one micro-batch keep between them (`active`, the start state of
    # the current phase); the pipeline passes one per micro-batch, as its pieces each begin anew
    carry: dict = field(default_factory=dict)


@dataclass
class LoopStep:
    """The end of one loop step (`LoopedLM.end_loop`), sequence-first [S, B, ...]."""

    x: Tensor  # the block's output x_t
    h: Tensor | None  # the normed state h_t = N(x_t) (None: neither read out nor handed over)
    logits: Tensor | DeferredLogits | None  # None: not read out
    gate_logits: Tensor  # [S, B]; lambda_t = sigmoid(gate_logits) (NaN: not read out)
    handover: Tensor  # what loop step t + 1 receives: h_t, or x_t in the no-norm ablation

    def stream_norm(self) -> Tensor:
        """Mean L2 norm of x_t over tokens (detached): the FLT paper's diagnostic."""
        return self.x.detach().float().norm(dim=-1).mean()


@dataclass
class LoopedOutput:
    """Sequence-first, like the activations: labels [B, S] pair with logits[t].transpose(0, 1)."""

    # [S, B, V] per loop step (V / tp under TP); None: not read out; DeferredLogits: computed
    # chunk by chunk by the loss (train.loss_chunk_tokens)
    logits: list[Tensor | DeferredLogits | None]
    gate_logits: Tensor  # [R, S, B]; lambda_t = sigmoid(gate_logits[t]) (NaN: not read out)
    hidden_norm: Tensor | None = None  # [R] mean L2 norm of the block output x_t (detached)


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.layer_offset = 0
        self.seq_shard = (0, 1)
        self.family = family_class(cfg.loop_mode)(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.prelude = self._layers("prelude", cfg.prelude_layers)
        self.block = self._layers("block", cfg.num_layers)
        if cfg.residual_scale > 0:  # the training R and the unique depth fix epsilon
            for layer in self.block:
                layer.branch_scale = cfg.residual_scale / (cfg.loops * math.sqrt(cfg.num_layers))
        self.coda = self._layers("coda", cfg.coda_layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_weights)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gate = nn.Linear(cfg.hidden_size, 1)
        self.loop_modules = self._family_modules(self.family.modules())
        self.embedding_modules = self._family_modules(self.family.embedding_modules())
        self.readout_modules = self._family_modules(self.family.readout_modules())
        cos, sin = rope_tables(cfg.kv_channels, cfg.max_seq_len, cfg.rope_theta, cfg.rope_reverse)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.memory = MemoryPolicy()
        self.reset_parameters()

    def _layers(self, segment: str, count: int) -> nn.ModuleList:
        return nn.ModuleList(DecoderLayer(self.cfg, self.family.value_embedding(segment, i))
                             for i in range(count))

    def _family_modules(self, modules: dict[str, nn.Module]) -> tuple[str, ...]:
        for name, module in modules.items():
            setattr(self, name, module)
        return tuple(modules)

    def set_memory(self, policy: MemoryPolicy) -> None:
        """What training keeps for backward (recompute, deferred readout); values unchanged."""
        self.memory = policy
        for m in self.modules():
            if isinstance(m, Attention):
                m.recompute_core = policy.recompute == "selective"

    def reset_parameters(self) -> None:
        """`normal`: N(0, init_std), residual output projections shrunk by the unrolled depth.
        `huginn` (Huginn-0125's `_init_weights`, raven_modeling_minimal.py): the same stds as
        normals truncated at +-3 std, and the MLP's up half (their fc's second chunk) at the
        output projections' std. `flt` (the FLT authors' init_weights): embedding N(0, 1), LM
        head N(0, 0.001), the other input projections uniform with std 1/sqrt(hidden), output
        projections zero. `parcae` (Parcae's scaled-zero with init_orthogonal,
        parcae_lm/utils/init.py): every other matrix -- q, k and v each, the MLP's up
        projection, the embedding, an untied head -- a truncated orthogonal matrix times
        init_std sqrt(max(rows, cols)), output projections zero. Value embeddings are
        initialised as nn.Embedding and nn.Linear are (Parcae's code leaves them so); a
        family's own modules last, by the family (`LoopFamily.init_parameters`)."""
        std, flt, parcae = self.cfg.init_std, self.cfg.init == "flt", self.cfg.init == "parcae"
        # the unrolled depth (a family may run the coda once, after the last loop)
        coda_runs = self.cfg.loops if self.family.coda_every_loop else 1
        depth = (self.cfg.prelude_layers + self.cfg.loops * self.cfg.num_layers
                 + coda_runs * self.cfg.coda_layers)
        out_std = std / math.sqrt(2 * max(depth, 1))
        bound = math.sqrt(3 / self.cfg.hidden_size)

        def normal(t: Tensor, sd: float) -> None:
            if self.cfg.init == "huginn":
                nn.init.trunc_normal_(t, 0.0, sd, -3 * sd, 3 * sd)
            else:
                nn.init.normal_(t, 0.0, sd)

        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("value_embed.table.weight"):
                nn.init.normal_(p)
            elif name.endswith("value_embed.gate.weight"):
                nn.init.uniform_(p, -1 / math.sqrt(p.shape[1]), 1 / math.sqrt(p.shape[1]))
            elif name == "gate.bias" or name.endswith("qk_bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.zeros_(p) if flt or parcae else normal(p, out_std)
            elif parcae and p.dim() == 2 and name != "gate.weight":
                owner = self.get_submodule(name.rsplit(".", 1)[0])
                for block in p.data.split(list(getattr(owner, "parts", (p.shape[0],))), dim=0):
                    trunc_orthogonal_(block, std * math.sqrt(max(block.shape)))
            elif flt and name == "embed.weight":
                nn.init.normal_(p, 0.0, 1.0)
            elif flt and name == "lm_head.weight":
                nn.init.normal_(p, 0.0, 0.001)
            elif flt and name.endswith("_proj.weight"):
                nn.init.uniform_(p, -bound, bound)
            elif self.cfg.init == "huginn" and name.endswith("gate_up_proj.weight"):
                gate, up = p.data.chunk(2)
                normal(gate, std)
                normal(up, out_std)
            else:
                normal(p, std)
        self.family.init_parameters(self)

    # -- one forward pass, loop step by loop step (the circular pipeline runs the pieces on
    # different stages; decoding runs them against a KV cache) -------------------------------

    def begin(self, ids: Tensor, store: KVStore | None = None, loops: int | None = None,
              read_steps: range | None = None, start: int = 0, backprop: int = 0,
              state: Tensor | None = None, state_seed: int | tuple[int, ...] | None = None,
              depths: tuple[tuple[int, int], ...] | None = None,
              carry: dict | None = None) -> LoopPass:
        """What every loop step of one forward over ids [B, S] shares: positions start.., the KV
        store, the loop count (default model.loops), the steps read out (default all), how many
        last steps build a graph (0: all) and an initial state x_0 where the family starts from
        one (`state`, else drawn from `state_seed`, or from torch's default generator); with
        `depths` (each sample's steps without and with a graph) each sample updates its state
        on its own steps only (`carry`: the pipeline's per-micro-batch store)."""
        loops = loops or self.cfg.loops
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)
        grad_from = max(loops - backprop, 0) if backprop else 0
        carry = {} if carry is None else carry
        if depths is not None and "active" not in carry:  # once per micro-batch; no host sync
            carry["active"] = active_steps(depths, loops, loops - grad_from).to(
                ids.device, non_blocking=True)
        return LoopPass(rope=(self.rope_cos[positions], self.rope_sin[positions]), ids=ids,
                        store=store if store is not None else NoKV(), loops=loops,
                        read_steps=range(loops) if read_steps is None else read_steps,
                        tokens=(ids.shape[1], ids.shape[0]), state=state, state_seed=state_seed,
                        grad_from=grad_from, active=carry.get("active"), carry=carry)

    def embed_stream(self, ids: Tensor, run: LoopPass) -> Tensor:
        """e = Prelude(Embed(ids) * embed_scale), ids [B, S] -> [S, B, H], as the family reads
        it (`LoopFamily.embedding`)."""
        e = self.embed(ids.t())
        if self.cfg.embed_scale != 1:
            e = e * self.cfg.embed_scale
        return self.family.embedding(self, self._run_layers("prelude", 0, e, run))

    def loop_input(self, t: int, e: Tensor | None, h: Tensor | None,
                   run: LoopPass) -> tuple[Tensor, Tensor | None]:
        """The start of loop step t: (x_t, the h_{t-1} the layers read) from e and what step
        t - 1 handed over (`LoopStep.handover`; None on step 0). With a depth per sequence, a
        sample idle on step t - 1 keeps its state: the start state of the phase (its idle
        steps come first in each), s_t = active[t-1] ? handed over : start."""
        if run.active is not None:
            if t == 0:
                h = run.carry["start"] = self.family.start_state(self, e, run)
            else:
                h = torch.where(run.active[t - 1][None, :, None], h, run.carry["start"])
                if t == run.grad_from:  # the second phase starts from here
                    run.carry["start"] = h
        return self.family.loop_input(self, t, e, h, run)

    def run_block(self, t: int, x: Tensor, h: Tensor | None, run: LoopPass) -> Tensor:
        """This module's layers of the shared block on loop step t; h: h_{t-1} where the family
        reads it."""
        call = recomputed if self.memory.recomputes_layer(t, run.loops) else plain
        for i, layer in enumerate(self.block):
            q_input = None
            if h is not None:
                x, q_input = self.family.layer_input(self.layer_offset + i, x, h)
            x, k, v = call(layer, x, *run.rope, q_input=q_input, ids=run.ids,
                           **run.store.attn_inputs("block", t, i))
            run.store.save("block", t, i, k, v)
        return x

    def end_loop(self, t: int, x: Tensor, run: LoopPass) -> LoopStep:
        """The end of loop step t from the block's output x_t: h_t = N(x_t), the readout if t
        is in `run.read_steps`, and what step t + 1 receives. The only place that sequences
        them -- training, the pipeline's last stage and decoding all call it."""
        read, family = t in run.read_steps, self.family
        # h_t is computed where it is handed over or read out (none kept for nothing)
        h = self.norm(x) if not family.hands_over_raw or (read and family.reads_state) else None
        if read:
            logits, gate = self._readout(self.family.readout_input(self, x, h), t, run)
        else:  # not read out: no logits, NaN gate logits (the FLT objectives skip them)
            logits, gate = None, torch.full(run.tokens, float("nan"), device=x.device)
        return LoopStep(x=x, h=h, logits=logits, gate_logits=gate,
                        handover=self.family.handover(x, h))

    def loop_state(self, step: LoopStep) -> Tensor:
        """h_t = N(x_t) of a loop step (computed here where `end_loop` had no use for it):
        what decoding's delta exit compares between steps."""
        return step.h if step.h is not None else self.norm(step.x)

    def _readout(self, h: Tensor, t: int, run: LoopPass) -> tuple[Tensor | DeferredLogits, Tensor]:
        """Logits and exit-gate logit of loop step t from what its readout reads: h_t = N(x_t),
        or the family's (`LoopFamily.readout_input`), through the coda and N."""
        if self.coda:
            h = self.norm(self._run_layers("coda", t, h, run))
        chunk = self.memory.chunk_rows
        if chunk and self.training and torch.is_grad_enabled():
            logits = DeferredLogits(h, self.head, chunk, self.memory.seq_shards)
        else:
            logits = self.head(h)
        # the gate after the head: the order fixes how h's two gradients are summed, and with
        # it every run's exact numbers
        return logits, self.gate(h).squeeze(-1)

    def head(self, h: Tensor) -> Tensor:
        """Logits from the readout state: LMHead(h), soft-capped when model.logit_softcap > 0."""
        logits = self.lm_head(h)
        cap = self.cfg.logit_softcap
        if cap > 0:
            logits = cap * torch.tanh(logits.float() / cap)
        return logits

    def _run_layers(self, segment: str, loop: int, x: Tensor, run: LoopPass) -> Tensor:
        """The prelude's or the coda's layers (plain layers, no loop signal)."""
        call = recomputed if self.memory.recompute == "full" else plain
        for i, layer in enumerate(getattr(self, segment)):
            x, k, v = call(layer, x, *run.rope, ids=run.ids, **run.store.attn_inputs(segment, loop, i))
            run.store.save(segment, loop, i, k, v)
        return x

    def forward(self, input_ids: Tensor, loops: int | None = None,
                read_steps: range | None = None, backprop: int = 0,
                state: Tensor | None = None, state_seed: int | tuple[int, ...] | None = None,
                depths: tuple[tuple[int, int], ...] | None = None) -> LoopedOutput:
        """Every loop step of ids [B, S]. `read_steps`: the loop steps read out (default all);
        training objectives that score some steps only skip the others' readout, as the FLT
        code does. `backprop` k > 0: only the last k steps build a graph."""
        run = self.begin(input_ids, loops=loops, read_steps=read_steps, backprop=backprop,
                         state=state, state_seed=state_seed, depths=depths)
        e = self.embed_stream(input_ids, run)
        handover, steps = None, []
        for t in range(run.loops):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t >= run.grad_from):
                x, h_read = self.loop_input(t, e, handover, run)
                step = self.end_loop(t, self.run_block(t, x, h_read, run), run)
            steps.append(step)
            handover = step.handover
        return self.output([s.logits for s in steps], torch.stack([s.gate_logits for s in steps]),
                           torch.stack([s.stream_norm() for s in steps]))

    def output(self, logits: list, gate_logits: Tensor, hidden_norm: Tensor) -> LoopedOutput:
        """The forward's result from its steps' pieces (the pipeline's last stage builds the
        same from the laps it ran)."""
        return LoopedOutput(logits, gate_logits, hidden_norm)
