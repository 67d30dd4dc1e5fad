"""A looped LM exported by `pretrain export`, as a `transformers` model under the names of the
public Ouro release (ByteDance/Ouro-1.4B: `OuroForCausalLM`, its module and weight names), so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` loads and generates without
the training framework. Our own implementation of the released function (arXiv 2510.25741):

    h = embed(ids); for t in 1..total_ut_steps: h = norm(layers(h)); keep h_t
    logits_t = lm_head(h_t),  lambda_t = sigmoid(early_exit_gate(h_t))
    p_t = lambda_t prod_{j<t} (1 - lambda_j) (t < T),  p_T = the remaining mass

Each layer is the sandwich-norm block x + norm2(attn(norm1(x))), y + norm4(mlp(norm3(y))),
RMSNorm in fp32, RoPE rotate-half, causal grouped-query attention, SwiGLU.

Readout (as the release): `exit_at_step` t (0-based) -> that step's logits; `exit_threshold` q
-> per token the first step whose cumulative exit probability reaches q (else the last);
`use_weighted_exit` -> the p-weighted mean of the step logits; otherwise the last step. With
labels the loss is the CE of the p-weighted mean logits (the release's convenience loss, not
the training objective). `output_loop_logits=True` adds every step's logits (`loop_logits`).

Generation recomputes the whole sequence for each new token (no KV cache: one implementation
that runs unchanged on transformers 4.5x and 5.x; the training framework's `pretrain generate`
has the per-loop caches). Self-contained: imports torch and transformers only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_ouro import OuroConfig
except ImportError:  # imported as a plain module
    from configuration_ouro import OuroConfig

_V5 = int(__import__("transformers").__version__.split(".")[0]) >= 5


class OuroRMSNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (y * self.weight.float()).to(x.dtype)


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), -1)


class OuroAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads,
                                                    config.num_key_value_heads, config.head_dim)
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, h, bias=False)

    def forward(self, x, cos, sin, mask):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = _rotate(q.float(), cos, sin).to(x.dtype), _rotate(k.float(), cos, sin).to(x.dtype)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class OuroMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class OuroDecoderLayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        eps = config.rms_norm_eps
        self.self_attn = OuroAttention(config)
        self.mlp = OuroMLP(config)
        self.input_layernorm = OuroRMSNorm(config.hidden_size, eps)
        self.input_layernorm_2 = OuroRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm = OuroRMSNorm(config.hidden_size, eps)
        self.post_attention_layernorm_2 = OuroRMSNorm(config.hidden_size, eps)

    def forward(self, x, cos, sin, mask):
        x = x + self.input_layernorm_2(self.self_attn(self.input_layernorm(x), cos, sin, mask))
        return x + self.post_attention_layernorm_2(self.mlp(self.post_attention_layernorm(x)))


class OuroPreTrainedModel(PreTrainedModel):
    config_class = OuroConfig
    base_model_prefix = "model"
    _no_split_modules = ["OuroDecoderLayer"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(0.0, 0.02)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()
        elif isinstance(module, OuroRMSNorm):
            module.weight.data.fill_(1.0)


class OuroModel(OuroPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(OuroDecoderLayer(config)
                                    for _ in range(config.num_hidden_layers))
        self.norm = OuroRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.early_exit_gate = nn.Linear(config.hidden_size, 1)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, loops=None):
        """Returns (the normed state h_t of every loop step, the gate logits of every step)."""
        cfg = self.config
        b, s = input_ids.shape
        device = input_ids.device
        inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32,
                                                    device=device) / cfg.head_dim)
        ang = torch.outer(torch.arange(s, dtype=torch.float32, device=device), inv)  # fp32, as
        cos, sin = ang.cos(), ang.sin()  # Ouro's release (Qwen2's rotary) computes it
        mask = torch.ones(s, s, dtype=torch.bool, device=device).tril()[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :].bool()
        h = self.embed_tokens(input_ids)
        states, gates = [], []
        for _ in range(loops or cfg.total_ut_steps):
            for layer in self.layers:
                h = layer(h, cos, sin, mask)
            h = self.norm(h)
            states.append(h)
            gates.append(self.early_exit_gate(h).squeeze(-1))
        return states, gates


class OuroForCausalLM(OuroPreTrainedModel, GenerationMixin):
    _tied_weights_keys = ({"lm_head.weight": "model.embed_tokens.weight"} if _V5
                          else ["lm_head.weight"])

    def __init__(self, config):
        super().__init__(config)
        self.model = OuroModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    @staticmethod
    def exit_distribution(gates):
        """p_t from the per-step gate logits, [B, S, T]."""
        p, survive = [], torch.ones_like(gates[0])
        for i, g in enumerate(gates):
            lam = torch.sigmoid(g.float())
            p.append(lam * survive if i < len(gates) - 1 else survive)
            survive = survive * (1 - lam)
        return torch.stack(p, -1)

    def forward(self, input_ids=None, attention_mask=None, labels=None, exit_at_step=None,
                exit_threshold=None, use_weighted_exit=False, output_loop_logits=False,
                loops=None, **kwargs):
        states, gates = self.model(input_ids, attention_mask, loops)
        step_logits = [self.lm_head(h) for h in states]
        pdf = self.exit_distribution(gates)
        exit_at_step = self.config.early_exit_step if exit_at_step is None else exit_at_step
        exit_threshold = (self.config.early_exit_threshold if exit_threshold is None
                          else exit_threshold)
        weighted = torch.stack(step_logits, 2).mul(pdf[..., None].to(step_logits[0].dtype)).sum(2)
        if labels is not None or use_weighted_exit:
            logits = weighted
        elif exit_at_step is not None:
            logits = step_logits[exit_at_step]
        elif exit_threshold is not None:
            reached = pdf.cumsum(-1) >= exit_threshold
            last = len(states) - 1
            step = torch.where(reached.any(-1), reached.float().argmax(-1), last)
            logits = torch.stack(step_logits, 2).gather(
                2, step[..., None, None].expand(-1, -1, 1, step_logits[0].shape[-1])).squeeze(2)
        else:
            logits = step_logits[-1]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=logits)
        if output_loop_logits:
            out["loop_logits"] = step_logits
            out["exit_pdf"] = pdf
        return out

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        """No cache: the whole sequence every step (see the module docstring)."""
        return {"input_ids": input_ids, "attention_mask": attention_mask}
