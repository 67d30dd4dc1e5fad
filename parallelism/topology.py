"""Who am I: rank, world, the TP x PP x DP process groups and the device, in one place.

Ranks come from whichever launcher started us (launch.py: torchrun, srun, mpirun).
Groups come from megatron-core's `parallel_state.initialize_model_parallel` (rank order
tp-cp-ep-dp-pp) on top of torch.distributed: NCCL with CUDA, gloo on CPU. The layout is checked
against the launched world before any process group exists, so a wrong layout costs one line.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from core.config_schema import ConfigError
from parallelism.launch import discover, export
from parallelism.watchdog import Watchdog


@dataclass
class Topology:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    tp: int = 1
    pp: int = 1
    dp: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    mp_group: dist.ProcessGroup | None = None  # tensor x pipeline (one model replica)
    pp_group: dist.ProcessGroup | None = None
    # the first and last stage of this rank's pipeline (megatron's embedding group): they
    # both hold a tied embedding; None on the stages between and without the pipeline
    tied_group: dist.ProcessGroup | None = None
    pp_next: int = 0  # global rank of the next pipeline stage (the ring wraps around)
    pp_prev: int = 0
    watchdog: Watchdog | None = None  # names a rank that died; see watchdog.py

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """This process's device: with one GPU visible (SLURM's per-task binding,
    CUDA_VISIBLE_DEVICES set per rank) it is cuda:0 whatever the local rank; with several, the
    one at the local rank (torchrun on a whole node)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: 'cuda' requested but CUDA is not available")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name != "cuda":
        return torch.device(name)
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if local_rank >= visible:
        raise ConfigError(f"train.device: local rank {local_rank} has no GPU of its own "
                          f"({visible} visible): launch at most {visible} processes per node")
    return torch.device("cuda", local_rank)


def _cpu_collectives_shim() -> None:
    """megatron-core's sequence-parallel collectives allocate their output buffers on
    `torch.cuda.current_device()`; on a CPU-only build that is the CPU. Gloo does the rest."""
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: "cpu"


def init_topology(cfg) -> Topology:
    """Join the launched job (torchrun's env://) and build the groups for `cfg.parallel` on
    `cfg.train.device`; a single process with a 1x1x1 layout needs no process group at all."""
    p = cfg.parallel
    launch = discover()
    if launch.source != "single":
        export(launch)
    world = launch.world
    if world != p.world_size:
        raise ConfigError(f"parallel: tensor {p.tensor} x pipeline {p.pipeline} x data {p.data} = "
                          f"{p.world_size} processes, but {world} were launched")
    local_rank = launch.local_rank
    device = pick_device(cfg.train.device, local_rank)
    if world == 1:
        return Topology(device=device)
    _init_default_group(device, p.backend, timedelta(minutes=p.timeout_minutes))
    return _with_groups(p, world, local_rank, device,
                        Watchdog(dist.get_rank(), world, grace=p.peer_timeout_s))


def _init_default_group(device: torch.device, backend: str = "auto",
                        timeout: timedelta | None = None) -> None:
    """The default process group over the launched world (env://): NCCL with CUDA, else
    gloo; the process's GPU selected first."""
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, **({} if timeout is None else {"timeout": timeout}))


def join_replicas(device_name: str) -> Topology:
    """Join a launched job in which every process holds the whole model (evaluation: each
    scores its share of the requests): data parallel over the world, no model-parallel
    groups; one process needs no process group."""
    launch = discover()
    device = pick_device(device_name, launch.local_rank)
    if launch.world == 1:
        return Topology(device=device)
    export(launch)
    _init_default_group(device)
    return Topology(world=launch.world, rank=dist.get_rank(), local_rank=launch.local_rank,
                    dp=launch.world, dp_rank=dist.get_rank(), device=device,
                    dp_group=dist.group.WORLD)


def rehearsal_topology(p, rank: int) -> Topology:
    """This one process as rank `rank` of layout `p` (the parallel section) on torch's fake
    process group, whose collectives do nothing: `pretrain plan --rehearse` runs the real
    parallelize / stage / checkpoint code of a 64-GPU layout on a laptop. `end_rehearsal`
    tears it down."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=p.world_size)
    try:
        return _with_groups(p, p.world_size, 0, torch.device("cpu"), None, gloo_groups=False)
    except BaseException:
        end_rehearsal()
        raise


def end_rehearsal() -> None:
    _megatron_state().destroy_model_parallel()
    dist.destroy_process_group()


def _megatron_state():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Transformer Engine and Apex are not installed"
        from megatron.core import parallel_state
    return parallel_state


def _with_groups(p, world: int, local_rank: int, device: torch.device,
                 watchdog: Watchdog | None, gloo_groups: bool = True) -> Topology:
    """megatron-core's TP x PP x DP groups on the joined world, as a Topology (`gloo_groups`:
    also megatron's gloo side groups, which the fake backend cannot make)."""
    _cpu_collectives_shim()
    ps = _megatron_state()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=p.tensor,
                                     pipeline_model_parallel_size=p.pipeline,
                                     distributed_timeout_minutes=int(max(p.timeout_minutes, 1)),
                                     create_gloo_process_groups=gloo_groups)
    return Topology(
        world=world, rank=dist.get_rank(), local_rank=local_rank, tp=p.tensor, pp=p.pipeline,
        dp=p.data, tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
        device=device, tp_group=ps.get_tensor_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(), mp_group=ps.get_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        tied_group=(ps.get_embedding_group() if p.pipeline > 1 and ps.is_rank_in_embedding_group()
                    else None),
        pp_next=ps.get_pipeline_model_parallel_next_rank(),
        pp_prev=ps.get_pipeline_model_parallel_prev_rank(), watchdog=watchdog)


def shutdown(topo: Topology) -> None:
    """Leave the job cleanly: stop the heartbeat, then the process groups."""
    if topo.watchdog is not None:
        topo.watchdog.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def on_main(topo: Topology, fn):
    """`fn()` run once, on rank 0, for a decision every rank must share (e.g. whether the run
    directory may be used): its result on every rank, or the exception it raised, re-raised on
    every rank so they all stop with the same one line."""
    try:
        out = (fn(), None) if topo.is_main else (None, None)
    except Exception as e:  # noqa: BLE001 -- carried to the other ranks, then re-raised
        out = (None, e)
    if topo.world > 1 and dist.is_initialized():
        box = [out]
        dist.broadcast_object_list(box, src=0)
        out = box[0]
    if out[1] is not None:
        raise out[1]
    return out[0]
