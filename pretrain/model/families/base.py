"""What a loop family is: how loop step t builds its input from the embedding stream e and
what step t - 1 handed over, what each block layer reads besides the stream, what it hands
over, its extra modules, and the terms the planner needs -- one subclass per family, registered
by name (`model.loop_mode` picks one). The model (model/looped.py), the circular pipeline, tensor
parallelism, FLOP and activation accounting ask the family; none of them names one.

Adding a family is one module under pretrain/model/families/ (or anywhere imported before the
config is read, a test file included): subclass `LoopFamily`, decorate it with `@register`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from core.config_schema import require
from pretrain.model.config import ModelConfig

_FAMILIES: dict[str, type[LoopFamily]] = {}


def register(cls: type[LoopFamily]) -> type[LoopFamily]:
    """Class decorator: make `cls` the family named `cls.name` (a name is taken once)."""
    if cls.name in _FAMILIES and _FAMILIES[cls.name] is not cls:
        raise ValueError(f"loop family {cls.name!r} is registered twice")
    _FAMILIES[cls.name] = cls
    return cls


def family_names() -> tuple[str, ...]:
    return tuple(_FAMILIES)


def family_class(name: str) -> type[LoopFamily]:
    """The registered family `name` (KeyError: none; `check_family` names the choices)."""
    return _FAMILIES[name]


def check_family(m: ModelConfig, per_sequence: bool = False) -> None:
    """model.loop_mode names a registered family, and that family accepts the model's fields
    (and a depth drawn per sequence, `per_sequence`)."""
    require(m.loop_mode in _FAMILIES, "model.loop_mode",
            f"expected one of {', '.join(map(repr, sorted(_FAMILIES)))}, got {m.loop_mode!r}")
    family = _FAMILIES[m.loop_mode]
    require(family.steps_alike or not per_sequence, "recurrence.per_sequence",
            f"the {m.loop_mode} family's loop steps differ (the first starts from e): a "
            "sequence cannot idle through some of them")
    family.check(m)


def _matmul_flops(modules) -> int:
    with torch.device("meta"):
        return 2 * sum(p.numel() for mod in modules().values() for p in mod.parameters()
                       if p.dim() >= 2)


@dataclass(frozen=True)
class Widths:
    """Per-token widths on one rank that a family's activation terms are made of (elements):
    h a hidden-sized tensor, r a norm's rsqrt, q_norm the queries' attn_norm(h) net of the query
    projection the core no longer keeps (0 inside a recomputed layer, which keeps its input
    only). model/activations.py builds them."""

    h: float
    r: float
    q_norm: float


class LoopFamily:
    """One looped model's recurrence. The defaults describe a family that restarts each loop
    from what the last one handed over and adds nothing of its own."""

    name: ClassVar[str]
    reads_embedding: ClassVar[bool] = False  # later loops read e (pipeline stage 0 keeps it)
    layers_read_state: ClassVar[bool] = False  # every layer reads h_{t-1} (it rides the ring)
    hands_over_raw: ClassVar[bool] = False  # step t + 1 receives x_t, not h_t = N(x_t)
    reads_state: ClassVar[bool] = True  # the readout reads h_t (else x_t alone: readout_input)
    coda_every_loop: ClassVar[bool] = True  # the unrolled depth counts the coda per loop (init)
    # every loop step is the same map of (x_{t-1}, e) from a start state x_0 (`start_state`):
    # a sequence may idle through its first steps (recurrence.per_sequence)
    steps_alike: ClassVar[bool] = False
    # the module (dotted name) whose `FORMAT` (pretrain/formats: ReleaseFormat) writes and reads
    # this family's released checkpoints; the Ouro release's layout, which refuses what it
    # cannot hold (another loop mode among them)
    release_format: ClassVar[str] = "pretrain.formats.ouro"

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    @classmethod
    def check(cls, m: ModelConfig) -> None:
        """Refuse model fields this family cannot honour (core.config_schema.require); a family
        defines its own handover, so the raw-handover ablation is refused (Ouro allows it)."""
        require(m.norm_between_loops, "model.norm_between_loops",
                f"false applies to loop_mode ouro only (the {cls.name} family defines its own "
                "handover)")

    def modules(self) -> dict[str, nn.Module]:
        """Extra modules, set on the model under these names: the pipeline keeps them on the
        stage that starts a lap (they build the loop input), tensor parallelism replicates
        them, and they run on every loop step (the iso-depth law's recurrent parameters)."""
        return {}

    def embedding_modules(self) -> dict[str, nn.Module]:
        """Modules `embedding` runs once per forward (stage 0; replicated under TP)."""
        return {}

    def readout_modules(self) -> dict[str, nn.Module]:
        """Modules `readout_input` runs once per readout (the last stage; replicated)."""
        return {}

    def embedding(self, model: nn.Module, e: Tensor) -> Tensor:
        """The embedding stream the loop reads, from the prelude's output."""
        return e

    def readout_input(self, model: nn.Module, x: Tensor, h: Tensor | None) -> Tensor:
        """What the coda (or, without one, the final norm's readout) reads after loop step t,
        from the block's output x_t and h_t = N(x_t) (None unless `reads_state`)."""
        return h

    def metrics(self, model: nn.Module) -> dict[str, float | None]:
        """Values the trainer logs with the step's metrics, by name (reduced by max over the
        ranks that hold them; None on a rank without the modules they read -- every rank
        returns the same names)."""
        return {}

    def undecayed(self) -> frozenset[str]:
        """Names of the family's matrices that weight decay leaves alone (the optimizer)."""
        return frozenset()

    def init_parameters(self, model: nn.Module) -> None:
        """Initialise the family's own modules on `model`, after the model's init (which
        drew them as any other weight of its scheme)."""

    def value_embedding(self, segment: str, index: int) -> bool:
        """Whether layer `index` of `segment` (prelude, block, coda) has a value embedding
        (model/layers.py `ValueEmbedding`)."""
        return False

    def value_embeddings(self, segment: str, indices: range) -> int:
        """How many of those layers of `segment` have one (FLOPs and activation bytes)."""
        return sum(self.value_embedding(segment, i) for i in indices)

    def initial_state(self, run, device: torch.device) -> Tensor:
        """x_0 for a family that starts the loop from a random state: [S, B, H] truncated
        normal(0, model.state_std, +-3 state_std) times model.embed_scale (zeros when state_std
        is 0), drawn from run.state_seed -- one generator for the batch, or one per sample
        (training: `LoopPlan.state_seeds`), or None: torch's default generator, as Huginn's and
        Parcae's released code draw it -- whole, on the stage that starts the loop."""
        s, b = run.tokens
        x = torch.zeros((s, b, self.cfg.hidden_size), device=device)
        std, seeds = self.cfg.state_std, run.state_seed
        if std > 0:
            cut = (0.0, std, -3 * std, 3 * std)
            if isinstance(seeds, tuple):  # each sample drawn whole (a contiguous [S, H])
                for i, seed in enumerate(seeds):
                    gen = torch.Generator(device=device).manual_seed(seed)
                    x[:, i] = nn.init.trunc_normal_(torch.empty_like(x[:, 0]), *cut, generator=gen)
            else:
                gen = None if seeds is None else torch.Generator(device=device).manual_seed(seeds)
                nn.init.trunc_normal_(x, *cut, generator=gen)
            x = x * self.cfg.embed_scale
        return x

    def start_state(self, model: nn.Module, e: Tensor, run) -> Tensor:
        """x_0 on this rank's sequence slice (sequence parallelism): the caller's `run.state`,
        else drawn (`initial_state`)."""
        state = run.state if run.state is not None else self.initial_state(run, e.device)
        index, count = model.seq_shard
        return state.chunk(count)[index].to(e.dtype)

    def loop_input(self, model: nn.Module, t: int, e: Tensor | None, h: Tensor | None,
                   run) -> tuple[Tensor, Tensor | None]:
        """(x_t, the h_{t-1} the block's layers read or None) at the start of loop step t
        (0-based) from e and what step t - 1 handed over (on step 0: None, or a family with
        `steps_alike` its start state)."""
        raise NotImplementedError

    def layer_input(self, index: int, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor | None]:
        """Before block layer `index` (of the whole block) on a step whose layers read h:
        (the layer's stream input, the input of its attention queries or None: from x)."""
        return x, None

    def handover(self, x: Tensor, h: Tensor) -> Tensor:
        """What loop step t + 1 receives from the block's output x_t and h_t = N(x_t)."""
        return x if self.hands_over_raw else h

    def ring_tensors(self, lap: int) -> int:
        """Hidden-sized tensors travelling between stages inside lap `lap` (x, and h_{t-1}
        where every layer reads it)."""
        return 2 if self.layers_read_state and lap > 0 else 1

    def loop_flops(self) -> int:
        """Forward FLOPs per token of the family's modules on one loop step: 2 per weight of
        a matrix (they are matmuls applied to every token; vectors -- norms, decays -- are
        elementwise work, not counted, as the layers' norms are not)."""
        return _matmul_flops(self.modules)

    def readout_flops(self) -> int:
        """Forward FLOPs per token of the readout modules, once per readout."""
        return _matmul_flops(self.readout_modules)

    def saved_first(self, w: Widths) -> float:
        """Elements per token that the first loop step's input keeps for backward (stage 0)."""
        return 0.0

    def saved_per_loop(self, w: Widths, layers: int, first_layer: bool, last: bool) -> float:
        """Elements per token each loop step t > 1 keeps beyond its layers' own on a stage with
        `layers` block layers (the block's first when `first_layer`; the readout when `last`)."""
        return 0.0
