"""The looped language model: one shared block of N decoder layers applied R times.

    e      = Prelude(Embed(x))                                    (prelude: 0 layers by default)
    h_0    = e
    h_t    = Block(h_{t-1})                       t = 1..R        (same weights every loop)
    n_t    = FinalNorm(Coda(h_t))                                 (coda: 0 layers by default)
    logits_t = LMHead(n_t),   lambda_t = sigmoid(w . n_t + b)     (exit gate, per token)

Every loop step produces logits and an exit probability; `objective.py` turns them into the
Ouro loss (arXiv 2510.25741, "Scaling Latent Reasoning via Looped Language Models").

Fully-Looped Transformer variant (Chen et al., "Simply Stabilizing the Loop via Fully Looped
Transformer", arXiv 2605.18797). The paper's two changes are parameter-free; this is the exact
form implemented here (our reading of the paper, stated so results can be compared):

  * inter-loop signal to every layer (`model.fully_looped`): layer i on loop t consumes
        z_{t,i} = (s_{t,i} + z_{t-1,i}) / 2      for t > 1,   z_{1,i} = s_{1,i}
    where s_{t,i} is the residual stream arriving at layer i and z_{t-1,i} what that same layer
    consumed on the previous loop. The layer returns z_{t,i} + Attn(.) + MLP(.) as usual.
    Averaging (not adding) keeps the stream from growing with R (the "residual explosion").
  * attention injection (`model.attention_injection`): on loops t > 1 the attention of layer i
    reuses its own projections and attends, causally, to the union of its current keys/values
    and the keys/values it produced on loop 1:
        Attn_t(q) = softmax(q [K_1; K_t]^T / sqrt(d) + causal) [V_1; V_t]
    so every loop sees the first loop's view of the context.

Both signals are local to a layer: under pipeline parallelism they stay on the stage that owns
the layer and never cross the wire.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from pretrain.config import ModelConfig
from pretrain.model.layers import DecoderLayer, RMSNorm, rope_tables

SEGMENTS = ("prelude", "block", "coda")


class KVStore(Protocol):
    """Where attention finds extra keys/values and leaves its own (training store or KV cache)."""

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict: ...

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None: ...


class LoopOneKV:
    """Training-time store: keeps loop 1's block keys/values when attention injection is on."""

    def __init__(self, inject: bool):
        self.inject = inject
        self.first: dict[int, tuple[Tensor, Tensor]] = {}

    def attn_inputs(self, segment: str, loop: int, layer: int) -> dict:
        if self.inject and segment == "block" and loop > 0:
            return {"inject": self.first[layer]}
        return {}

    def save(self, segment: str, loop: int, layer: int, k: Tensor, v: Tensor) -> None:
        if self.inject and segment == "block" and loop == 0:
            self.first[layer] = (k, v)


@dataclass
class LoopedOutput:
    """Sequence-first, like the activations: labels [B, S] pair with logits[t].transpose(0, 1)."""

    logits: list[Tensor]  # one [S, B, V] per loop step (V / tp under tensor parallelism)
    gate_logits: Tensor  # [R, S, B]; lambda_t = sigmoid(gate_logits[t])


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.prelude = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.prelude_layers))
        self.block = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.coda = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.coda_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.gate = nn.Linear(cfg.hidden_size, 1)
        cos, sin = rope_tables(cfg.kv_channels, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, init_std); residual output projections shrink with the unrolled depth."""
        std = self.cfg.init_std
        depth = self.cfg.prelude_layers + self.cfg.loops * (self.cfg.num_layers + self.cfg.coda_layers)
        out_std = std / math.sqrt(2 * max(depth, 1))
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name == "gate.bias":
                nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        return self.rope_cos[positions], self.rope_sin[positions]

    def run_layers(
        self,
        segment: str,
        loop: int,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        store: KVStore,
        signals: list[Tensor] | None = None,
    ) -> tuple[Tensor, list[Tensor] | None]:
        """Apply one segment's layers. For the fully-looped block, `signals` are the inputs each
        layer consumed on the previous loop; the inputs consumed now are returned for the next."""
        mix = segment == "block" and self.cfg.fully_looped
        consumed: list[Tensor] = []
        for i, layer in enumerate(getattr(self, segment)):
            if mix:
                if signals is not None:
                    x = 0.5 * (x + signals[i])
                consumed.append(x)
            x, k, v = layer(x, *rope, **store.attn_inputs(segment, loop, i))
            store.save(segment, loop, i, k, v)
        return x, (consumed if mix else None)

    def readout(
        self, h: Tensor, loop: int, rope: tuple[Tensor, Tensor], store: KVStore
    ) -> tuple[Tensor, Tensor]:
        """Logits and exit-gate logit of loop step `loop` from the block output h."""
        y, _ = self.run_layers("coda", loop, h, rope, store)
        n = self.norm(y)
        return self.lm_head(n), self.gate(n).squeeze(-1)

    def forward(self, input_ids: Tensor, loops: int | None = None) -> LoopedOutput:
        loops = loops or self.cfg.loops
        rope = self.rope(torch.arange(input_ids.shape[1], device=input_ids.device))
        store = LoopOneKV(self.cfg.attention_injection)
        h, _ = self.run_layers("prelude", 0, self.embed(input_ids.t()), rope, store)
        signals = None
        logits, gates = [], []
        for t in range(loops):
            h, signals = self.run_layers("block", t, h, rope, store, signals)
            lg, g = self.readout(h, t, rope, store)
            logits.append(lg)
            gates.append(g)
        return LoopedOutput(logits=logits, gate_logits=torch.stack(gates))
