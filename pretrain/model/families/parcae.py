"""Parcae: a prelude, a recurrent block entered through a diagonal, spectrally bounded injection,
and a coda -- the released Parcae (arXiv 2604.12946; sandyresearch/parcae,
parcae_lm/models/parcae/parcae.py `forward`, `iterate_forward`, `core_block_forward`,
`initialize_state`; modules/injection.py `DiagonalInjection`; models/parcae/init.py):

    e   = N_p(Prelude(Embed(ids)))                          (N_p: `prelude_norm`, an RMSNorm)
    x_0 ~ truncated normal(0, state_std, +-3 state_std)     (their "like-init" state)
    x_t = Block(exp(-dt A) * x_{t-1} + dt B e)               dt = softplus(dt_bias), A = exp(A_log)
    logits = LMHead(N(Coda(C x_R)))                          (C: a Linear H -> H without bias)

The injection's decay exp(-dt A) lies in (0, 1) per channel, so the state's recurrence is a
contraction whatever the weights (their "spectral norm": its largest entry,
`injection_spectral_norm`). The raw block output x_t is handed over (no norm between loops).
Value embeddings (model/layers.py `ValueEmbedding`) sit on the layers their two parity rules
select (`value_embedding`). Initialisation as theirs: A_log 0, dt_bias the inverse softplus of
-ln(sqrt(1/5)) (decay sqrt(1/5)), B the identity, C a truncated orthogonal matrix times
init_std sqrt(H) (with `model.init: parcae` for the layers). Read out after any loop step t,
the model is theirs run for t steps (their `partial_depth_eval`).

Departures, by name: their RoPE rotates adjacent pairs (2i, 2i+1), ours (i, i + D/2) -- the same
function after one fixed permutation of each head's query/key rows; their gate rule for value
embeddings reads n_layer = recurrent layers x mean_backprop_depth, even in every released config
(4), so the gates sit on odd layer ids here whatever `recurrence.backprop` is; their QK-norm
takes F.rms_norm's default epsilon of the input's dtype (bf16's 2^-7 under autocast), ours
`model.qk_norm_eps` in fp32; the recurrent block has the model's width (their
recurrent_embedding_dimension equals n_embd in every release); only the diagonal injection
(their default) is offered; as theirs, weight decay leaves B and C alone (`undecayed`; A_log
and dt_bias are vectors, undecayed anyway). Their "per-sequence" depth (`recurrence.per_sequence`,
model/recurrence.py) runs the step at the global batch's largest depth (theirs: the rank's) and
idles a sequence through the first steps of a phase, not the last (the same function: every
step is the same map, `steps_alike`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from core.config_schema import require
from pretrain.model.families.base import LoopFamily, register
from pretrain.model.layers import RMSNorm, trunc_orthogonal_

DECAY = math.sqrt(1 / 5)  # the injection's initial decay (their ssm_decay default)


class DiagonalInjection(nn.Module):
    """x_{t-1}, e -> exp(-dt A) * x_{t-1} + dt * (e B^T), per channel dt = softplus(dt_bias),
    A = exp(A_log)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.A_log = nn.Parameter(torch.zeros(hidden))
        self.dt_bias = nn.Parameter(torch.zeros(hidden))
        self.B = nn.Parameter(torch.eye(hidden))

    def decay(self) -> Tensor:
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        dt = F.softplus(self.dt_bias)
        return x * torch.exp(-dt * torch.exp(self.A_log)) + dt * (e @ self.B.t())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        dt = -math.log(DECAY)
        self.A_log.zero_()
        self.dt_bias.fill_(dt + math.log(-math.expm1(-dt)))  # softplus(dt_bias) = dt
        self.B.copy_(torch.eye(self.B.shape[0]))


def _has_value_embedding(index: int, layers: int) -> bool:
    """Their alternating rule (mixer.py `has_ve`): the last layer and every second one before."""
    return index % 2 == (layers - 1) % 2


@register
class Parcae(LoopFamily):
    name = "parcae"
    reads_embedding = True
    hands_over_raw = True
    steps_alike = True
    reads_state = False  # the readout reads C x_t
    coda_every_loop = False  # their expected depth counts the coda once
    release_format = "pretrain.formats.parcae"  # their module's tensor names and config.json

    @classmethod
    def check(cls, m):
        super().check(m)
        require(m.coda_layers >= 1, "model.coda_layers",
                "parcae reads out through a coda (C then the coda's layers): set >= 1")
        require(m.hidden_size >= 32, "model.hidden_size",
                f"parcae's value-embedding gate reads 32 channels, got hidden_size {m.hidden_size}")

    def modules(self):
        return {"injection": DiagonalInjection(self.cfg.hidden_size)}

    def embedding_modules(self):
        return {"prelude_norm": RMSNorm(self.cfg.hidden_size, self.cfg.norm_eps)}

    def readout_modules(self):
        return {"readout_proj": nn.Linear(self.cfg.hidden_size, self.cfg.hidden_size, bias=False)}

    def embedding(self, model, e):
        return model.prelude_norm(e)

    def loop_input(self, model, t, e, h, run):
        if h is None:
            h = self.start_state(model, e, run)
        return model.injection(h, e), None

    def readout_input(self, model, x, h):
        return model.readout_proj(x)

    def value_embedding(self, segment, index):
        m = self.cfg
        p, b = m.prelude_layers, m.num_layers
        unique = {"prelude": index, "block": p + index, "coda": p + b + index}[segment]
        layer_id = {"prelude": index, "block": p + index, "coda": p + b * m.loops + index}[segment]
        return _has_value_embedding(unique, p + b + m.coda_layers) and layer_id % 2 == 1

    def undecayed(self):
        return frozenset({"injection.B", "readout_proj.weight"})  # theirs: _no_weight_decay

    def init_parameters(self, model):
        model.injection.reset_parameters()
        w = model.readout_proj.weight
        trunc_orthogonal_(w.data, self.cfg.init_std * math.sqrt(max(w.shape)))
        nn.init.ones_(model.prelude_norm.weight)

    def metrics(self, model):
        injection = model.injection
        return {"family/injection_spectral_norm":
                None if injection is None else injection_spectral_norm(injection)}

    def saved_first(self, w):
        # x_0 and e B^T (the injection's products), e (its matmul's input, read every loop),
        # and the prelude norm's input, rsqrt and normalised output (its weight's gradient)
        return 3 * w.h + 2 * w.h + w.r

    def saved_per_loop(self, w, layers, first_layer, last):
        return 2 * w.h if first_layer else 0.0  # x_{t-1} and e B^T


def injection_spectral_norm(injection: DiagonalInjection) -> float:
    """The spectral norm of the state's map x -> exp(-dt A) * x: its largest per-channel decay
    (< 1, a contraction, whatever the weights)."""
    with torch.no_grad():
        return float(injection.decay().max())
