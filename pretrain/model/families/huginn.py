"""Huginn: x_t = Adapter([x_{t-1}; e]) with x_0 a random state -- the released Huginn-0125
(arXiv 2502.05171; seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py
`iterate_forward`, `core_block_forward`, `initialize_state`): Adapter a Linear 2H -> H without
bias, e = Prelude(Embed(ids) * embed_scale), x_0 ~ truncated normal(0, state_std, +-3
state_std) * embed_scale (`LoopFamily.initial_state`; a caller may pass it in: `LoopPass.state`).
The raw block output x_t is handed over (no norm between recurrences); the readout is theirs,
N(Coda(N(x_t))) -> LMHead, the coda running once after the last recurrence, and their
objective reads the last step only (`objective.kind: last`; configs/huginn-*.yaml also set
their sandwich_style, qk_bias, embed_scale, tied embeddings). Their RoPE rotates adjacent
pairs (2i, 2i+1); ours rotates (i, i + D/2): the same function after one fixed permutation of
each head's query/key rows, which their format's export/import applies
(pretrain/formats/huginn.py).
"""

from __future__ import annotations

import torch
from torch import nn

from pretrain.model.families.base import LoopFamily, register


@register
class Huginn(LoopFamily):
    name = "huginn"
    reads_embedding = True
    hands_over_raw = True
    steps_alike = True
    coda_every_loop = False  # their effective depth: the coda once, after the last loop
    release_format = "pretrain.formats.huginn"  # Huginn-0125's tensor names and config.json

    def modules(self):
        h = self.cfg.hidden_size
        return {"adapter": nn.Linear(2 * h, h, bias=False)}

    def loop_input(self, model, t, e, h, run):
        if h is None:
            h = self.start_state(model, e, run)
        return model.adapter(torch.cat((h, e), dim=-1)), None

    def saved_first(self, w):
        return 2 * w.h  # [x_0; e], the adapter's input

    def saved_per_loop(self, w, layers, first_layer, last):
        return 2 * w.h if first_layer else 0.0  # [x_{t-1}; e]
