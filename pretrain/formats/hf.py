"""Hugging Face export and import: safetensors + config.json (+ tokenizer) in a release's own
layout. Each loop family names its format (`LoopFamily.release_format`, pretrain/formats: the
Ouro release's by default, Huginn-0125's, Parcae's); export writes the model's family's, import
reads a config.json with the first format that recognises it (the Ouro layout last: it reads
any). This module names no family and no format.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from core.durable import new_file_mode
from pretrain.config import ConfigError, dump_config
from pretrain.formats import ReleaseFormat, family_format
from pretrain.model.families import family_class, family_names


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
    fmt = family_format(family_class(cfg.model.loop_mode))
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
    fmt = next(f for f in _formats() if f.reads(hf))
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


def _formats() -> list[ReleaseFormat]:
    """The registered families' formats, each once, the one that reads any config.json last."""
    out = []
    for name in family_names():
        f = family_format(family_class(name))
        if f not in out:
            out.append(f)
    return sorted(out, key=lambda f: f.reads({}))


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
