"""Configuration of an exported looped LM, in the fields of the public Ouro release
(ByteDance/Ouro-1.4B `configuration_ouro.py`): written by `pretrain export` beside the weights
and loaded with `trust_remote_code=True`. Self-contained: it imports only transformers."""

from transformers import PretrainedConfig


class OuroConfig(PretrainedConfig):
    model_type = "ouro"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(self, vocab_size=49152, hidden_size=2048, intermediate_size=5632,
                 num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=None,
                 head_dim=None, hidden_act="silu", max_position_embeddings=4096,
                 rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False,
                 total_ut_steps=4, early_exit_threshold=None, early_exit_step=None,
                 use_cache=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.total_ut_steps = total_ut_steps
        self.early_exit_threshold = early_exit_threshold
        self.early_exit_step = early_exit_step
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
