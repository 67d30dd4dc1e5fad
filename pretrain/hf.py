"""Hugging Face format in the layout of the public Ouro release (`OuroForCausalLM`).

Weight names (ours -> Ouro's; i over the shared block's layers):

  embed.weight                       model.embed_tokens.weight
  block.i.attn_norm.weight           model.layers.i.input_layernorm.weight
  block.i.attn.qkv_proj.weight       model.layers.i.self_attn.{q,k,v}_proj.weight (rows split)
  block.i.attn.o_proj.weight         model.layers.i.self_attn.o_proj.weight
  block.i.attn_post_norm.weight      model.layers.i.input_layernorm_2.weight   (sandwich norm)
  block.i.mlp_norm.weight            model.layers.i.post_attention_layernorm.weight
  block.i.mlp.gate_up_proj.weight    model.layers.i.mlp.{gate,up}_proj.weight (rows split)
  block.i.mlp.down_proj.weight       model.layers.i.mlp.down_proj.weight
  block.i.mlp_post_norm.weight       model.layers.i.post_attention_layernorm_2.weight
  norm.weight                        model.norm.weight
  gate.{weight,bias}                 model.early_exit_gate.{weight,bias}
  lm_head.weight                     lm_head.weight (absent when tie_word_embeddings)

config.json fields: hidden_size, num_hidden_layers (the shared block), num_attention_heads,
num_key_value_heads, head_dim, intermediate_size, vocab_size, total_ut_steps (= loops R),
early_exit_threshold, max_position_embeddings, rope_theta, rms_norm_eps,
tie_word_embeddings, hidden_act "silu", and `auto_map` pointing at the modeling files the export
writes beside the weights (pretrain/hf_files: our own `transformers` implementation of the same
function under Ouro's class names), so `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads and generates without this framework (transformers 4.5x and
5.x). RoPE is rotate-half in both. Variants Ouro has no
names for (another loop mode, prelude/coda layers, the FLT recipe's layers) are refused, not
approximated. A `loop_mode: huginn` model is written in Huginn-0125's own format instead, and
a Huginn config.json (model_type huginn_raven) is read as one (pretrain/huginn_format.py); a
`loop_mode: parcae` model in Parcae's tensor names and config fields, and a config.json with
`_class_name: ParcaeConfig` is read as one (pretrain/parcae_format.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config_schema import Override
from core.durable import new_file_mode
from core.weight_layout import FUSED_BLOCKS, split_for
from pretrain.config import Config, ConfigError, ModelConfig, dump_config
from pretrain.huginn_format import from_huginn, huginn_config, to_huginn
from pretrain.huginn_format import model_overrides as huginn_overrides
from pretrain.parcae_format import from_parcae, parcae_config, to_parcae
from pretrain.parcae_format import model_overrides as parcae_overrides

MODELING_FILES = ("configuration_ouro.py", "modeling_ouro.py")
_LAYER = {"attn_norm.weight": "input_layernorm.weight",
          "attn_post_norm.weight": "input_layernorm_2.weight",
          "mlp_norm.weight": "post_attention_layernorm.weight",
          "mlp_post_norm.weight": "post_attention_layernorm_2.weight",
          "attn.o_proj.weight": "self_attn.o_proj.weight",
          "mlp.down_proj.weight": "mlp.down_proj.weight"}
_FUSED = {"attn.qkv_proj.weight": "self_attn.{}_proj.weight",
          "mlp.gate_up_proj.weight": "mlp.{}_proj.weight"}
_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
        "gate.weight": "model.early_exit_gate.weight", "gate.bias": "model.early_exit_gate.bias",
        "lm_head.weight": "lm_head.weight"}


# what the Ouro format holds: any other value of these fields is refused, naming the field
OURO_FORMAT = {"loop_mode": "ouro", "norm_between_loops": True, "prelude_layers": 0,
               "coda_layers": 0, "sandwich_norm": True, "qk_norm": False, "norm_weights": True,
               "mlp": "swiglu", "logit_softcap": 0.0, "rope_reverse": False,
               "sandwich_style": "ouro", "qk_bias": False, "embed_scale": 1.0,
               "residual_scale": 0.0}


def _check_exportable(m: ModelConfig) -> None:
    for name, value in OURO_FORMAT.items():
        if getattr(m, name) != value:
            raise ConfigError(f"model.{name}: {getattr(m, name)!r} has no counterpart in the Ouro "
                              f"format (it holds {name}={value!r} only)")


def to_hf(m: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our full (single-process) state dict -> Ouro's tensors."""
    _check_exportable(m)
    out = {}
    for name, value in state.items():
        if name in _TOP:
            if not (name == "lm_head.weight" and m.tie_embeddings):
                out[_TOP[name]] = value
            continue
        _, i, rest = name.split(".", 2)
        prefix = f"model.layers.{i}."
        if rest in _LAYER:
            out[prefix + _LAYER[rest]] = value
        else:
            split = split_for(m, name)
            blocks = FUSED_BLOCKS[rest.split(".")[-2]]
            for block, piece in zip(blocks, value.split(list(split.parts), dim=split.dim),
                                    strict=True):
                out[prefix + _FUSED[rest].format(block)] = piece.contiguous()
    return out


def from_hf(m: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ouro's tensors -> our state dict (the exact inverse of `to_hf`)."""
    out = {ours: tensors[theirs] for ours, theirs in _TOP.items()
           if theirs in tensors and not (ours == "lm_head.weight" and m.tie_embeddings)}
    if m.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    for i in range(m.num_layers):
        prefix = f"model.layers.{i}."
        for ours, theirs in _LAYER.items():
            out[f"block.{i}.{ours}"] = tensors[prefix + theirs]
        for ours, theirs in _FUSED.items():
            blocks = FUSED_BLOCKS[ours.split(".")[-2]]
            out[f"block.{i}.{ours}"] = torch.cat([tensors[prefix + theirs.format(b)]
                                                  for b in blocks], dim=0)
    return out


def hf_config(cfg: Config) -> dict:
    m = cfg.model
    return {"architectures": ["OuroForCausalLM"], "model_type": "ouro",
            "hidden_size": m.hidden_size, "num_hidden_layers": m.num_layers,
            "num_attention_heads": m.num_heads, "num_key_value_heads": m.num_kv_heads,
            "head_dim": m.kv_channels, "intermediate_size": m.ffn_hidden_size,
            "vocab_size": m.vocab_size, "total_ut_steps": m.loops, "early_exit_threshold": 1.0,
            "max_position_embeddings": m.max_seq_len, "rope_theta": m.rope_theta,
            "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings,
            "hidden_act": "silu", "torch_dtype": "float32", "use_cache": False,
            "auto_map": {"AutoConfig": "configuration_ouro.OuroConfig",
                         "AutoModelForCausalLM": "modeling_ouro.OuroForCausalLM"}}


def model_config(hf: dict) -> list[Override]:
    """Ouro's config.json as our `model.*` overrides."""
    try:
        pairs = {"vocab_size": hf["vocab_size"], "hidden_size": hf["hidden_size"],
                 "num_layers": hf["num_hidden_layers"], "num_heads": hf["num_attention_heads"],
                 "num_kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
                 "head_dim": hf.get("head_dim") or 0, "ffn_hidden_size": hf["intermediate_size"],
                 "loops": hf.get("total_ut_steps", 4),
                 "max_seq_len": hf.get("max_position_embeddings", 4096),
                 "rope_theta": hf.get("rope_theta", 10000.0), "norm_eps": hf.get("rms_norm_eps", 1e-6),
                 "tie_embeddings": hf.get("tie_word_embeddings", False)}
    except KeyError as e:
        raise ConfigError(f"config.json: missing field {e.args[0]!r}") from None
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"config.json: hidden_act {hf['hidden_act']!r}: only silu (SwiGLU) maps")
    return [(f"model.{k}", v) for k, v in pairs.items()] + [("model.sandwich_norm", True)]


def export(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """A checkpoint of any layout -> model.safetensors + config.json + tokenizer files.

    The tokenizer file is named by the checkpoint's config, which may come from anyone: it is
    parsed and written anew, never copied as bytes. Everything is written into a sibling
    directory renamed onto `out_dir` at the end, so a failure leaves no half export."""
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import EOS_TOKEN, byte_tokenizer, load_tokenizer
    from pretrain.checkpoint.offline import load_model, tensor_bytes, timed

    cfg, model = load_model(checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer) if cfg.data.tokenizer else byte_tokenizer()
    out = Path(out_dir)
    partial = out.with_name(f".{out.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fmt = _FORMATS[cfg.model.loop_mode if cfg.model.loop_mode in _FORMATS else "ouro"]
    tensors, config = fmt.to_theirs(cfg.model, model.state_dict()), fmt.config(cfg)
    with timed(f"writing {out / 'model.safetensors'}", tensor_bytes(tensors)):
        save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    for name in fmt.files:
        shutil.copy(Path(__file__).parent / "hf_files" / name, partial / name)
    tokenizer.save(str(partial / "tokenizer.json"))
    # model_input_names: the model reads no token_type_ids, so `model(**tok(text))` works
    (partial / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS_TOKEN,
         "model_max_length": cfg.model.max_seq_len,
         "model_input_names": ["input_ids", "attention_mask"]}, indent=2))
    mode = new_file_mode()  # what the user's other new files get (safetensors writes 0600)
    for f in partial.iterdir():
        f.chmod(mode)
    partial.rename(out)  # replaces a missing or empty out_dir (the CLI claimed it)
    return out


def import_hf(hf_dir: str | Path, out_dir: str | Path, base_config: str | Path | None = None,
              allow_nonfinite: bool = False) -> Path:
    """Ouro weights -> a step-0 checkpoint under `out_dir/checkpoints` (model only: the
    optimizer starts fresh) that `pretrain train --resume` continues from. Every weight the
    model reads must be there, of config.json's shape, a float (fp32/bf16/fp16/fp64: an
    integer, boolean or fp8 tensor is refused, not cast) and finite unless `allow_nonfinite`."""
    from pretrain.checkpoint.offline import save_full_model
    from pretrain.config import load_config
    from pretrain.model.looped import LoopedLM

    src = Path(hf_dir)
    files = sorted(src.glob("*.safetensors"))
    if not (src / "config.json").is_file() or not files:
        raise ConfigError(f"{src}: expected config.json and *.safetensors")
    try:
        hf = json.loads((src / "config.json").read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise ConfigError(f"{src / 'config.json'}: not JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{src / 'config.json'}: expected a JSON object")
    fmt = next(f for f in _FORMATS.values() if f.reads(hf))  # Ouro's last: it reads any
    overrides = [*fmt.overrides(hf), ("train.out_dir", str(Path(out_dir).resolve()))]
    if (src / "tokenizer.json").is_file():
        overrides.append(("data.tokenizer", str((src / "tokenizer.json").resolve())))
    try:
        cfg = load_config(base_config, overrides)
    except ConfigError as e:
        raise ConfigError(f"{src / 'config.json'}: {e}") from None
    tensors = _Reads(_read_safetensors(files))
    try:
        state = fmt.to_ours(cfg.model, tensors)
    except KeyError as e:
        raise ConfigError(f"{src}: weight {e.args[0]} missing for config.json's shapes") from None
    except (RuntimeError, IndexError) as e:  # pieces that do not fit together (torch.cat)
        raise ConfigError(f"{src}: weights do not match config.json's shapes "
                          f"({str(e).splitlines()[0]})") from None
    for name in sorted(tensors.read):
        _check_weight(src, name, tensors[name], allow_nonfinite)
    model = LoopedLM(cfg.model)
    expected = model.state_dict()
    missing = sorted(expected.keys() - state.keys())
    if missing:
        raise ConfigError(f"{src}: no weight for {missing[0]} (config.json's model has it)")
    wrong = [f"{k} {tuple(v.shape)} (config.json: {tuple(expected[k].shape)})"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if wrong:
        raise ConfigError(f"{src}: weights do not match config.json's shapes: {wrong[0]}")
    model.load_state_dict(state)
    (Path(out_dir)).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "config.yaml").write_text(dump_config(cfg))
    return save_full_model(cfg, model, Path(out_dir) / "checkpoints")


@dataclass(frozen=True)
class _Format:
    """One release's format: our state -> their tensors, their config.json, their tensors ->
    our state, their config.json -> our overrides, whether a config.json is theirs, and the
    modeling files written beside an export (Huginn's and Parcae's are not ours to ship:
    README says how to load them)."""

    to_theirs: Callable
    config: Callable
    to_ours: Callable
    overrides: Callable
    reads: Callable[[dict], bool]
    files: tuple[str, ...] = ()


# by loop mode; any other mode is written in Ouro's names (or refused, naming the field)
_FORMATS = {
    "huginn": _Format(to_huginn, huginn_config, from_huginn, huginn_overrides,
                      lambda hf: hf.get("model_type") == "huginn_raven"),
    "parcae": _Format(to_parcae, parcae_config, from_parcae, parcae_overrides,
                      lambda hf: hf.get("_class_name") == "ParcaeConfig"),
    "ouro": _Format(to_hf, hf_config, from_hf, model_config, lambda hf: True, MODELING_FILES),
}


class _Reads(dict):
    """The tensors of a release, remembering which names a format mapping read."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__(tensors)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> torch.Tensor:
        self.read.add(name)
        return super().__getitem__(name)


def _read_safetensors(files: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from pretrain.checkpoint.offline import timed

    tensors: dict[str, torch.Tensor] = {}
    for i, f in enumerate(files, 1):
        try:
            with timed(f"reading [{i}/{len(files)}] {f}", f.stat().st_size):
                tensors.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001 -- safetensors raises its own error types
            raise ConfigError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_weight(src: Path, name: str, t: torch.Tensor, allow_nonfinite: bool) -> None:
    if t.dtype not in _FLOATS:
        raise ConfigError(f"{src}: {name} is {str(t.dtype).removeprefix('torch.')}, not a float "
                          "weight (fp32, bf16, fp16): it is not cast on import")
    if not allow_nonfinite and not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{src}: {name} holds NaN or Inf (--allow-nonfinite imports it as it is)")
