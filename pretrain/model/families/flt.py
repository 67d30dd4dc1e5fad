"""The Fully Looped Transformer paper's families (Chen et al., arXiv 2605.18797; repository
FuRuF-11/FullyLoopedTransformer, nanochat/gpt.py `GPT.forward`, `Block`, `Block_res`), with nu a
weightless RMSNorm and h_{t-1} = N(x_{t-1}) handed over:

  lt       x_1 = nu(e), x_t = h_{t-1}: the plain looped transformer baseline.
  lt_i     x_1 = nu(e), x_t = nu(e + h_{t-1}): additive input injection.
  lt_ia    x_t = nu(e) every loop; on t > 1 the block's first layer takes its attention
           queries from h_{t-1} (keys/values from the stream).
  flt      x_t = nu(e) every loop; on t > 1 *every* layer takes its attention queries from
           h_{t-1}, keys/values from the stream (the Fully Looped Transformer).
  flt_res  x_t = nu(e) every loop; on t > 1 every layer first mixes x = nu(x + h_{t-1}), then
           runs as a plain layer.

Their norms are weightless: the FLT configs set `model.norm_weights: false`. Queries from h use
the layer's own input norm (attn_norm(h)), which is their norm(h) when the norms are weightless.
"""

from __future__ import annotations

from pretrain.model.families.base import LoopFamily, register
from pretrain.model.layers import rms_norm


class _FromEmbedding(LoopFamily):
    """x_1 = nu(e); later steps as each subclass says."""

    def loop_input(self, model, t, e, h, run):
        return rms_norm(e, self.cfg.norm_eps), None

    def saved_first(self, w):
        return w.h + w.r  # e and nu's rsqrt


class _Restarting(_FromEmbedding):
    """x_t = nu(e) every step; the block's layers read h_{t-1} on t > 1."""

    reads_embedding = True

    def loop_input(self, model, t, e, h, run):
        return rms_norm(e, self.cfg.norm_eps), h

    def saved_per_loop(self, w, layers, first_layer, last):
        return w.r if first_layer else 0.0  # nu(e) again


@register
class LT(_FromEmbedding):
    name = "lt"

    def loop_input(self, model, t, e, h, run):
        return (super().loop_input(model, t, e, h, run) if t == 0 else (h, None))

    def saved_per_loop(self, w, layers, first_layer, last):
        return -w.h if (first_layer and last) else 0.0  # h is counted by the readout


@register
class LTInjected(_FromEmbedding):
    name = "lt_i"
    reads_embedding = True

    def loop_input(self, model, t, e, h, run):
        x = e if t == 0 else e + h
        return rms_norm(x, self.cfg.norm_eps), None

    def saved_per_loop(self, w, layers, first_layer, last):
        return (w.h + w.r) if first_layer else 0.0  # e + h and its rsqrt


@register
class LTInjectedAttention(_Restarting):
    name = "lt_ia"

    def layer_input(self, index, x, h):
        return x, (h if index == 0 else None)

    def saved_per_loop(self, w, layers, first_layer, last):
        return super().saved_per_loop(w, layers, first_layer, last) + (w.q_norm if first_layer else 0.0)


@register
class FLT(_Restarting):
    name = "flt"
    layers_read_state = True

    def layer_input(self, index, x, h):
        return x, h

    def saved_per_loop(self, w, layers, first_layer, last):
        return super().saved_per_loop(w, layers, first_layer, last) + layers * w.q_norm


@register
class FLTResidual(_Restarting):
    name = "flt_res"
    layers_read_state = True

    def layer_input(self, index, x, h):
        return rms_norm(x + h, self.cfg.norm_eps), None

    def saved_per_loop(self, w, layers, first_layer, last):
        return super().saved_per_loop(w, layers, first_layer, last) + layers * (w.h + w.r)
