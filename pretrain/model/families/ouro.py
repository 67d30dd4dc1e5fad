"""Ouro: x_1 = e, x_t = h_{t-1} = N(x_{t-1}) -- the released Ouro model (ByteDance/Ouro-1.4B,
modeling_ouro.py `OuroModel.forward`; arXiv 2510.25741 Sec. 3): `model.norm` ends every loop and
the normalised state feeds the next loop, the exit gate and the LM head.
`model.norm_between_loops: false` (an ablation, not a published model) hands the raw x_t over.
"""

from __future__ import annotations

from pretrain.model.families.base import LoopFamily, register


@register
class Ouro(LoopFamily):
    name = "ouro"

    @classmethod
    def check(cls, m):
        pass  # norm_between_loops: false is this family's ablation

    def handover(self, x, h):
        return h if self.cfg.norm_between_loops else x

    def loop_input(self, model, t, e, h, run):
        return (e if t == 0 else h), None

    def saved_per_loop(self, w, layers, first_layer, last):
        # the input is the last loop's h, already counted by its readout on the same stage
        return -w.h if (first_layer and last) else 0.0
