"""Typed run configuration: a YAML file plus dotted overrides, validated before any work starts.

Every problem raises `ConfigError` whose message is one line naming the field, so the CLI can
print it and exit 2 without a traceback (a typo in a sweep must not cost a queued GPU job).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message names the offending field."""


@dataclass
class ModelConfig:
    vocab_size: int = 257
    hidden_size: int = 64
    num_layers: int = 2  # layers of the shared looped block
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_heads
    ffn_hidden_size: int = 256
    loops: int = 4  # R: how many times the shared block is applied
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    rope_reverse: bool = False  # rotate by -angle: nanochat's (the FLT code's) RoPE sense
    norm_eps: float = 1e-6
    sandwich_norm: bool = True  # Ouro: RMSNorm before and after each sublayer
    tie_embeddings: bool = False
    prelude_layers: int = 0  # unshared layers run once before the loop (Huginn-style)
    coda_layers: int = 0  # unshared layers run on every loop's output before the head
    # how one loop hands over to the next (model/looped.py): the released Ouro function, or the
    # Fully Looped Transformer paper's FLT / FLT_res and its baselines LT, LT_i, LT_ia
    loop_mode: Literal["ouro", "lt", "lt_i", "lt_ia", "flt", "flt_res"] = "ouro"
    # False (an ablation, not a published model): ouro mode carries the raw stream x_t into the
    # next loop and norms only the readout -- this framework's loop before it matched the release
    norm_between_loops: bool = True
    qk_norm: bool = False  # FLT recipe: weightless RMSNorm of queries and keys after RoPE
    norm_weights: bool = True  # False: RMSNorm without a learned scale (FLT recipe)
    mlp: Literal["swiglu", "relu2"] = "swiglu"  # relu2: down(relu(up(x))^2) (FLT recipe)
    logit_softcap: float = 0.0  # > 0: logits = c tanh(logits / c) (FLT recipe: 15)
    init: Literal["normal", "flt"] = "normal"  # flt: the FLT authors' initialisation
    dropout: float = 0.0
    init_std: float = 0.02

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class ObjectiveConfig:
    # elbo / adaptive_gate: Ouro stage 1 / stage 2; last / all / few: the FLT paper's CE on the
    # last loop, the mean over every loop, or over loops floor(2R/3)..R (1-based: the last third)
    kind: Literal["elbo", "adaptive_gate", "last", "all", "few"] = "elbo"
    gate_target: Literal["paper", "lookahead"] = "paper"  # stage 2: Ouro Eq. 5-6, or ours
    beta: float = 0.1  # entropy weight of the ELBO (uniform prior over exit steps)
    gate_k: float = 50.0  # adaptive gate: slope of the "another loop still helps" target
    gate_gamma: float = 0.005  # adaptive gate: CE improvement that counts as helping


@dataclass
class OptimConfig:
    # muon: torch.optim.Muon for the layers' matrices, AdamW for embedding, head, gate, norms
    name: Literal["adamw", "muon"] = "adamw"
    lr: float = 3e-4
    min_lr: float = 3e-5
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping (the norm is still logged)
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 0
    decay_fraction: float = 0.2  # WSD: the final fraction of steps spent decaying to min_lr
    embedding_lr: float = 0.0  # peak lr of the embedding; 0: lr (every group follows the schedule)
    head_lr: float = 0.0  # peak lr of the LM head; 0: lr
    muon_lr: float = 0.02  # peak lr of Muon's matrices (optim.name: muon)
    muon_momentum: float = 0.95


@dataclass
class SourceConfig:
    path: str = ""  # directory holding manifest.json (made by `pretrain data tokenize`)
    weight: float = 1.0
    # how to open a shard when it is not a local file next to the manifest, e.g.
    # "pipe:aws s3 cp s3://bucket/corpus/{shard} -" ({shard}: its name, {dir}: path above)
    url_template: str = ""


@dataclass
class DataConfig:
    source: Literal["text", "shards"] = "text"
    paths: list[str] = field(default_factory=lambda: ["data/sample.txt"])  # source: text
    sources: list[SourceConfig] = field(default_factory=list)  # source: shards
    tokenizer: str = ""  # tokenizer.json whose hash every manifest must carry (optional)
    shuffle: bool = True
    shuffle_buffer: int = 1024  # windows shuffled together (bounded shuffle buffer)
    mixture_window: int = 1000  # proportions of the sources are exact over every such window
    num_workers: int = 2
    prefetch: int = 4  # micro-batches in flight per worker
    on_error: Literal["raise", "skip"] = "raise"


@dataclass
class TrainConfig:
    seed: int = 1234
    max_steps: int = 100
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    seq_len: int = 128
    log_every: int = 10
    out_dir: str = "runs/default"
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 0  # steps between sharded checkpoints; 0: only at the end
    keep_last: int = 3  # complete checkpoints kept on disk; 0: all
    async_checkpoint: bool = False  # write checkpoints in the background while training goes on
    peak_flops: float = 0.0  # per device, for MFU; 0: the GPU table, or measured on a CPU


@dataclass
class ParallelConfig:
    tensor: int = 1  # TP: megatron-core tensor parallelism
    pipeline: int = 1  # PP: the circular pipeline over the looped block
    data: int = 1  # DP
    sequence_parallel: bool = False  # shard norms/residuals along the sequence within TP
    pipeline_schedule: Literal["1f1b", "gpipe"] = "1f1b"  # interleaved 1F1B over the R laps
    pipeline_split: list[int] = field(default_factory=list)  # block layers per stage; []: auto
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with CUDA, else gloo
    timeout_minutes: float = 10.0  # process-group timeout
    peer_timeout_s: float = 15.0  # a rank without heartbeat this long is declared dead
    zero_stage: int = 0  # 0: plain data parallelism; 1, 2: DeepSpeed ZeRO over the DP group

    @property
    def world_size(self) -> int:
        return self.tensor * self.pipeline * self.data


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check `value` against the annotation `tp`; floats also accept ints and '3e-4' strings."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{name}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping of fields, got {value!r}")
        return _build(tp, value, name)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin is list:
        if not isinstance(value, list):
            raise bad
        return [_coerce(v, typing.get_args(tp)[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {name}")


# fields that no longer exist, and what replaced them
REMOVED = {
    "model.fully_looped": "removed: the Fully Looped Transformer is model.loop_mode=flt "
                          "(or flt_res, lt, lt_i, lt_ia)",
    "model.attention_injection": "removed: attention injection is model.loop_mode=lt_ia "
                                 "(queries of the first layer from the previous loop) or flt",
}


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            if where in REMOVED:
                if not raw[key]:  # the old default, as older checkpoints' configs record it
                    continue
                raise ConfigError(f"{where}: {REMOVED[where]}")
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key{hint}")
    kwargs = {}
    for name in names:
        if name in raw:
            full = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(raw[name], hints[name], full)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected section.key=value")
    key, _, text = override.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {override!r}: empty key component")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {text!r} ({e.__class__.__name__})") from None
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read YAML at `path` (optional), apply `a.b=value` overrides, build and validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            line = getattr(getattr(e, "problem_mark", None), "line", None)
            at = f" line {line + 1}" if line is not None else ""
            raise ConfigError(f"{p}{at}: invalid YAML") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        tree = loaded or {}
    for o in overrides:
        _set_dotted(tree, o)
    cfg = _build(Config, tree, "")
    validate(cfg)
    return cfg


def _require(cond: bool, field_name: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{field_name}: {message}")


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express."""
    m, t, o, ob = cfg.model, cfg.train, cfg.optim, cfg.objective
    for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                 "ffn_hidden_size", "max_seq_len"):
        _require(getattr(m, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(m, name)}")
    _require(m.loops >= 1, "model.loops", f"must be >= 1, got {m.loops}")
    _require(m.head_dim >= 0, "model.head_dim", f"must be >= 0, got {m.head_dim}")
    if m.head_dim == 0:
        _require(m.hidden_size % m.num_heads == 0, "model.num_heads",
                 f"hidden_size {m.hidden_size} is not divisible by num_heads {m.num_heads}")
    _require(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
             f"num_heads {m.num_heads} is not divisible by num_kv_heads {m.num_kv_heads}")
    _require(m.kv_channels % 2 == 0, "model.head_dim",
             f"RoPE needs an even head dimension, got {m.kv_channels}")
    _require(m.prelude_layers >= 0, "model.prelude_layers", "must be >= 0")
    _require(m.coda_layers >= 0, "model.coda_layers", "must be >= 0")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    _require(m.rope_theta > 0, "model.rope_theta", "must be > 0")
    _require(m.norm_eps > 0, "model.norm_eps", "must be > 0")
    _require(m.init_std > 0, "model.init_std", "must be > 0")
    _require(m.norm_between_loops or m.loop_mode == "ouro", "model.norm_between_loops",
             f"false applies to loop_mode ouro only (the {m.loop_mode} mode defines its own handover)")
    _require(m.logit_softcap >= 0, "model.logit_softcap", f"must be >= 0, got {m.logit_softcap}")
    _require(ob.beta >= 0, "objective.beta", f"must be >= 0, got {ob.beta}")
    _require(ob.gate_k > 0, "objective.gate_k", "must be > 0")
    if ob.kind == "adaptive_gate":
        _require(m.loops >= 2, "objective.kind", "adaptive_gate needs model.loops >= 2")
    for name in ("embedding_lr", "head_lr", "muon_lr"):
        _require(getattr(o, name) >= 0, f"optim.{name}", f"must be >= 0, got {getattr(o, name)}")
    _require(0 <= o.muon_momentum < 1, "optim.muon_momentum", "must be in [0, 1)")
    if o.name == "muon":
        _require(cfg.parallel.zero_stage == 0, "optim.name",
                 "muon does not shard with DeepSpeed ZeRO: use parallel.zero_stage=0")
        _require(cfg.parallel.tensor == 1, "optim.name",
                 "muon orthogonalises whole matrices and a tensor-parallel rank holds a shard: "
                 "use parallel.tensor=1 (data and pipeline parallelism compose)")
    _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
    _require(0 <= o.min_lr <= o.lr, "optim.min_lr", f"must be in [0, lr={o.lr}], got {o.min_lr}")
    _require(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _require(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _require(o.eps > 0, "optim.eps", "must be > 0")
    _require(o.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    _require(0 <= o.warmup_steps <= t.max_steps, "optim.warmup_steps",
             f"must be in [0, train.max_steps={t.max_steps}], got {o.warmup_steps}")
    _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
    _require(t.max_steps >= 1, "train.max_steps", f"must be >= 1, got {t.max_steps}")
    for name in ("micro_batch_size", "grad_accum_steps", "seq_len", "log_every", "max_bad_steps"):
        _require(getattr(t, name) >= 1, f"train.{name}", f"must be >= 1, got {getattr(t, name)}")
    _require(t.seq_len <= m.max_seq_len, "train.seq_len",
             f"{t.seq_len} exceeds model.max_seq_len {m.max_seq_len}")
    _require(bool(t.out_dir), "train.out_dir", "must not be empty")
    for name in ("checkpoint_every", "keep_last"):
        _require(getattr(t, name) >= 0, f"train.{name}", f"must be >= 0, got {getattr(t, name)}")
    d = cfg.data
    if d.source == "text":
        _require(len(d.paths) >= 1, "data.paths", "needs at least one path")
    else:
        _require(len(d.sources) >= 1, "data.sources", "needs at least one {path, weight}")
        for i, src in enumerate(d.sources):
            _require(bool(src.path), f"data.sources[{i}].path", "must not be empty")
            _require(src.weight > 0, f"data.sources[{i}].weight", f"must be > 0, got {src.weight}")
        _require(d.mixture_window >= len(d.sources), "data.mixture_window",
                 f"must be >= the number of sources ({len(d.sources)})")
    _require(d.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
    _require(d.num_workers >= 0, "data.num_workers", "must be >= 0")
    _require(d.prefetch >= 1, "data.prefetch", "must be >= 1")
    validate_parallel(cfg)


def validate_parallel(cfg: Config) -> None:
    """Layout checks that need no process group (so they fail before any is created)."""
    p, m = cfg.parallel, cfg.model
    for name in ("tensor", "pipeline", "data"):
        _require(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}")
    _require(p.timeout_minutes > 0, "parallel.timeout_minutes", "must be > 0")
    _require(p.peer_timeout_s > 0, "parallel.peer_timeout_s", "must be > 0")
    _require(p.zero_stage in (0, 1, 2), "parallel.zero_stage", f"must be 0, 1 or 2, got {p.zero_stage}")
    _require(p.zero_stage < 2 or p.pipeline == 1, "parallel.zero_stage",
             "ZeRO-2 does not compose with the circular pipeline (DeepSpeed reduces a gradient "
             "partition once per step; the laps produce it several times): use zero_stage 1")
    tp = p.tensor
    if tp > 1:
        for name in ("hidden_size", "num_heads", "ffn_hidden_size", "vocab_size"):
            value = getattr(m, name)
            _require(value % tp == 0, f"model.{name}",
                     f"{value} is not divisible by parallel.tensor {tp}")
        _require(m.num_kv_heads % tp == 0, "model.num_kv_heads",
                 f"{m.num_kv_heads} KV heads cannot be split over parallel.tensor {tp} "
                 "(needs num_kv_heads % tensor == 0)")
        _require(m.dropout == 0 or _cuda_available(), "model.dropout",
                 "dropout > 0 with parallel.tensor > 1 needs CUDA (megatron's RNG tracker)")
    if p.sequence_parallel:
        _require(tp > 1, "parallel.sequence_parallel", "needs parallel.tensor > 1")
        _require(cfg.train.seq_len % tp == 0, "train.seq_len",
                 f"{cfg.train.seq_len} is not divisible by parallel.tensor {tp} "
                 "(sequence parallelism)")
    if p.pipeline > 1:
        _require(m.num_layers >= p.pipeline, "parallel.pipeline",
                 f"{p.pipeline} stages need at least as many shared layers, got {m.num_layers}")
        _require(not m.tie_embeddings, "model.tie_embeddings",
                 "tied embeddings live on the first and last stage; not supported with pipeline > 1")
        if p.pipeline_split:
            _require(len(p.pipeline_split) == p.pipeline and min(p.pipeline_split) >= 1
                     and sum(p.pipeline_split) == m.num_layers, "parallel.pipeline_split",
                     f"{p.pipeline_split} must be {p.pipeline} positive layer counts summing to "
                     f"model.num_layers {m.num_layers}")
        m_count = cfg.train.grad_accum_steps
        if p.pipeline_schedule == "1f1b" and m.loops > 1:
            _require(m_count % p.pipeline == 0, "train.grad_accum_steps",
                     f"{m_count} microbatches do not fit the interleaved 1F1B schedule over "
                     f"{m.loops} laps: need a multiple of parallel.pipeline {p.pipeline} "
                     "(or parallel.pipeline_schedule=gpipe)")
    else:
        _require(not p.pipeline_split, "parallel.pipeline_split", "needs parallel.pipeline > 1")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def absolute_paths(cfg: Config) -> None:
    """Resolve the config's relative file paths against the current directory, for runs that
    start elsewhere (a SLURM job in its run directory, a sweep point)."""
    cfg.train.out_dir = str(Path(cfg.train.out_dir).resolve())
    cfg.data.paths = [str(Path(p).resolve()) for p in cfg.data.paths]
    for src in cfg.data.sources:
        if "://" not in src.path and not src.path.startswith("pipe:"):
            src.path = str(Path(src.path).resolve())
    if cfg.data.tokenizer:
        cfg.data.tokenizer = str(Path(cfg.data.tokenizer).resolve())


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
