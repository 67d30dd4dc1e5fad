"""`pretrain plan --fake`: the real training step of every pipeline stage of a layout, at the
config's full shapes, under fake tensors -- what one rank will allocate, compute and send,
measured on a laptop before a 64-GPU job is queued.

For one rank of each pipeline stage, this process joins torch's fake process group as that
rank (parallelism/topology.py `rehearsal_topology`: collectives move nothing), builds the model
under `FakeTensorMode` (shapes and dtypes, no memory), and runs `step_engine.build_engine` and
`train_step` unchanged -- TP layers, the circular pipeline, the reducer or ZeRO, autocast,
recompute, the optimizer -- with the host syncs answered so the step is taken (`HostSyncsPass`:
a fake loss has no value). Step 0 creates the optimizer state; step 1 runs under
`StepProfile`, which counts:

  peak bytes   live storages, each counted once however many tensors view it (so the shared
               block, called R times, is its parameters once plus what each call saves);
               every fake tensor alive when step 1 starts (parameters, optimizer state,
               DeepSpeed's buffers) is live from the start
  FLOPs        torch.utils.flop_counter's formulas per op (matmuls), the CPU flash attention
               kernel's by the same convention (full scores; backward 2.5 x), executed FLOPs:
               recompute included
  ops          dispatched non-view ATen ops (eager kernel launches, to a first order)
  comm bytes   per c10d collective (all-reduce, all-gather, reduce-scatter, send/recv), the
               full tensor's size (an all-gather's output, a reduce-scatter's input)

The fake device is the CPU (a fake CUDA device needs a CUDA build); torch AdamW is set fused,
as it runs on CUDA (pretrain/kernels.py).
"""

from __future__ import annotations

import dataclasses
import gc
import os
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import (
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
    unset_fake_temporarily,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

from parallelism.topology import Topology, end_rehearsal, rehearsal_topology
from pretrain.config import Config, ConfigError
from pretrain.model.looped import LoopedLM
from pretrain.step_engine import build_engine


def _attention(q: Tensor, k: Tensor, v: Tensor, *_, **__) -> int:
    """Scores and weighted sum of the CPU flash kernel, full (torch's convention), any number
    of key/value heads (grouped queries: each query head does the work)."""
    b, h, s_q, d = q.shape
    return 2 * b * h * s_q * k.shape[-2] * (d + v.shape[-1])


def _attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, *_, **__) -> int:
    """The scores again, then dV, dP, dQ, dK: 2.5 x the forward at d = d_v."""
    b, h, s_q, d = q.shape
    return 2 * b * h * s_q * k.shape[-2] * (3 * d + 2 * v.shape[-1])


aten = torch.ops.aten
FLOPS = {**flop_registry,
         aten._scaled_dot_product_flash_attention_for_cpu: _attention,
         aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward}


def _kernel(func) -> bool:
    """An op that launches work of its own (not a view, a primitive or a collective)."""
    return func.namespace not in ("prim", "c10d") and not func.is_view


class OpCount(TorchDispatchMode):
    """How many kernel-launching ops run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += _kernel(func)
        return func(*args, **(kwargs or {}))


class HostSyncsPass(TorchDispatchMode):
    """A host sync (`.item()`, `bool(t)`) of a fake tensor reads 0 (False): every "is anything
    wrong" flag -- ours (step_engine.PlainUpdate, all_ranks_agree), DeepSpeed's overflow and
    grad-norm checks -- says no, and the step is taken. (The loop count, which decides shapes,
    is drawn outside fake mode.)"""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return 0.0 if args[0].dtype.is_floating_point else 0
        return func(*args, **(kwargs or {}))


class StepProfile(TorchDispatchMode):
    """Peak live storage bytes, FLOPs, op count and collective bytes of what runs under it."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[int, int] = {}
        self.live = self.peak = self.ops = 0
        self.flops = 0.0
        self.comm: Counter[str] = Counter()

    def hold(self, t) -> None:
        """Count `t`'s storage as live until the storage is freed."""
        if not isinstance(t, Tensor):
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.sizes:
            return
        self.sizes[key] = storage.nbytes()
        self.live += self.sizes[key]
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace == "c10d":
            sizes = [sum(t.nbytes for t in tree_leaves(a) if isinstance(t, Tensor)) for a in args[:2]]
            self.comm[func.__name__.split(".")[0].strip("_")] += max(sizes, default=0)
        self.ops += _kernel(func)
        count = FLOPS.get(func.overloadpacket)
        if count is not None:
            self.flops += count(*args, **kwargs, out_val=out)
        for t in tree_leaves(out):
            self.hold(t)
        return out


@dataclass
class StageProfile:
    stage: int
    rank: int
    peak_bytes: int
    static_bytes: int  # parameters, buffers and optimizer state before the step
    flops: float
    ops: int
    comm: dict[str, int] = field(default_factory=dict)


def _fused_adamw(optimizer) -> None:
    """torch AdamW (alone, inside DeepSpeed's wrapper, or beside Muon: MuonAdamW.adamw) set
    fused, as it runs on CUDA."""
    inner = getattr(optimizer, "optimizer", optimizer)
    opt = getattr(inner, "adamw", inner)
    if isinstance(opt, torch.optim.AdamW):
        for g in opt.param_groups:
            g["fused"], g["foreach"] = True, False


def _live(mode: FakeTensorMode) -> list[Tensor]:
    """Every fake tensor of `mode` alive now: parameters, buffers, the optimizer's state,
    DeepSpeed's flat partitions -- whatever the step starts with."""
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, FakeTensor)
            and getattr(o, "fake_mode", mode) is mode]


def profile_stage(cfg: Config, rank: int, stage: int) -> StageProfile:
    """Rank `rank` of `cfg`'s layout: step 0, then step 1 under `StepProfile`."""
    single = cfg.parallel.world_size == 1
    topo = Topology() if single else rehearsal_topology(cfg.parallel, rank)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as fake, HostSyncsPass(), \
                _deepspeed_shims():
            model = LoopedLM(cfg.model)
            engine = build_engine(cfg, model, topo, log=lambda _: None)
            _fused_adamw(getattr(engine.update, "optimizer", None))
            plan = engine.loop_plan  # a sampled R is drawn from real numbers, as in the run
            engine.loop_plan = lambda *a: _unfaked(plan, *a)
            batches = _batches(cfg)
            engine.train_step(batches, 0)
            prof = StepProfile()
            for t in _live(fake):
                prof.hold(t)
            static = prof.live
            with prof:
                engine.train_step(batches, 1)
        return StageProfile(stage, rank, prof.peak, static, prof.flops, prof.ops, dict(prof.comm))
    except UnsupportedOperatorException as e:  # torch 2.9's c10d ops have no fake kernels
        raise ConfigError(f"plan --fake: torch {torch.__version__} cannot run {e.func} under "
                          f"fake tensors (torch 2.13 can)") from None
    finally:
        if not single:
            end_rehearsal()


@contextmanager
def _deepspeed_shims():
    """DeepSpeed asks for LOCAL_RANK, and moves the module to its device once more (build_engine
    has placed it): a fake parameter cannot be swapped for itself, so `to` stays put."""
    saved = os.environ.get("LOCAL_RANK")
    os.environ["LOCAL_RANK"] = "0"
    try:
        with mock.patch.object(nn.Module, "to", lambda module, *_, **__: module):
            yield
    finally:
        if saved is None:
            os.environ.pop("LOCAL_RANK")
        else:
            os.environ["LOCAL_RANK"] = saved


def _unfaked(fn, *args):
    with unset_fake_temporarily():
        return fn(*args)


def profile_layout(cfg: Config) -> list[StageProfile]:
    """One rank of every pipeline stage (megatron's rank order: stage k starts at k*TP*DP)."""
    p = cfg.parallel
    return [profile_stage(cfg, k * p.tensor * p.data, k) for k in range(p.pipeline)]


def _batches(cfg: Config) -> list[tuple[Tensor, Tensor]]:
    b, s = cfg.train.micro_batch_size, cfg.train.seq_len
    return [(torch.zeros(b, s, dtype=torch.long), torch.zeros(b, s, dtype=torch.long))
            for _ in range(cfg.train.grad_accum_steps)]


def _toy(cfg: Config, micro_batches: int) -> Config:
    """`cfg` with every width at its smallest and the same structure: layers, loops, objective,
    recompute, and as many loss chunks (sequence rows, model/memory.py) per loop step."""
    m, t = cfg.model, cfg.train
    chunks = -(-t.seq_len // t.loss_chunk_tokens) if t.loss_chunk_tokens else 0
    seq = 4 * max(chunks, 1)
    # head_dim 8: narrower, SDPA on the CPU falls back to its math kernel (other ops)
    model = dataclasses.replace(m, vocab_size=8, hidden_size=8 * m.num_heads, head_dim=8,
                                ffn_hidden_size=8,
                                max_seq_len=seq)
    # a batch of one or of several: reshapes after a transpose copy only for several
    train = dataclasses.replace(t, seq_len=seq, micro_batch_size=min(t.micro_batch_size, 2),
                                compile=False,
                                grad_accum_steps=micro_batches,
                                loss_chunk_tokens=4 if chunks else 0)
    return dataclasses.replace(cfg, model=model, train=train,
                               parallel=dataclasses.replace(cfg.parallel, tensor=1, pipeline=1,
                                                            data=1, zero_stage=0))


_OPS: dict[str, tuple[int, int]] = {}


def eager_ops(cfg: Config) -> tuple[int, int]:
    """(ATen ops per micro-batch, per step besides) of the whole model's eager training step in
    one process, counted by running step 0 (the optimizer's state creation included) on real
    tensors at the smallest widths with 1 and 2 micro-batches: the count of ops does not depend
    on the widths. Not in it: TP's collectives, the pipeline's messages. Cached per structure."""
    key = repr(_toy(cfg, 1))
    if key not in _OPS:
        counts = []
        for m in (1, 2):
            toy = _toy(cfg, m)
            engine = build_engine(toy, LoopedLM(toy.model), Topology(), log=lambda _: None)
            with OpCount() as count:
                engine.train_step(_batches(toy), 0)
            counts.append(count.ops)
        _OPS[key] = counts[1] - counts[0], 2 * counts[0] - counts[1]
    return _OPS[key]
