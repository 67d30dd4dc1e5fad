"""Sharded save and load through torch.distributed.checkpoint, synchronous or in the background.

Every rank writes only its own entries (`parallelism.sharded_state`); rank 0 adds the global
record and seals the directory (`store.seal`). Checkpoint traffic runs on its own gloo process
group, so a background save never interleaves its collectives with the training step's. At
most one save is in flight: the next save, a load, or exit waits for it.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from parallelism.topology import Topology
from pretrain.checkpoint import store
from pretrain.checkpoint.metadata import SafeLoadPlanner, SafeReader

Entries = dict[str, torch.Tensor]
# single-process saves and loads (no_dist) are what we ask for; DCP warns that it assumes them
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized, assuming the intent", category=UserWarning)


def _snapshot(entries: Entries) -> Entries:
    """Private copies, so training may update the live tensors while they are written."""
    out = {}
    for k, v in entries.items():
        if isinstance(v, DTensor):
            out[k] = DTensor.from_local(v.to_local().detach().cpu().clone(), v.device_mesh,
                                        v.placements, run_check=False, shape=v.shape,
                                        stride=v.stride())
        else:
            out[k] = v.detach().cpu().clone()
    return out


def _cause(e: BaseException) -> str:
    """One line for what went wrong: the first rank's own error inside DCP's wrapper (a
    BaseException carrying every rank's traceback), with its errno text if it has one."""
    if isinstance(e, CheckpointException) and e.failures:
        e = next(iter(e.failures.values()))[0]
    if isinstance(e, OSError) and e.strerror:
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    first = str(e).strip().splitlines()
    return first[0] if first else type(e).__name__


class Checkpointer:
    def __init__(self, root: Path, topo: Topology, keep_last: int = 0, background: bool = False,
                 log: Callable[[str], None] = print, local: bool = False):
        """`local`: this process alone reads/writes (offline tools), even inside a job."""
        self.root, self.topo, self.keep_last, self.log = Path(root), topo, keep_last, log
        self.distributed = not local and dist.is_available() and dist.is_initialized()
        self.group = dist.new_group(backend="gloo") if self.distributed else None
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="ckpt") if background else None
        self.pending: Future | None = None
        self.last: Path | None = None
        self.stall_s = 0.0  # time the training loop spent inside save()

    def _all_gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        out: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def save(self, step: int, entries: Entries, meta: dict, config_text: str) -> None:
        tick = time.perf_counter()
        self.wait()
        if self.executor is None:
            self._write(step, entries, meta, config_text)
        else:
            self.pending = self.executor.submit(self._write, step, _snapshot(entries), meta,
                                                config_text)
        self.stall_s += time.perf_counter() - tick

    def wait(self) -> Path | None:
        """Block until the in-flight save (if any) is sealed; its errors surface here."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            pending.result()
        return self.last

    def _write(self, step: int, entries: Entries, meta: dict, config_text: str) -> None:
        """Write and seal one checkpoint; a failure (a full disk, say) is one line naming the
        step, the error, the free space and the newest complete checkpoint (what a resume
        will use: the partial `step_N.tmp` is removed then)."""
        try:
            self._write_and_seal(step, entries, meta, config_text)
        except (Exception, CheckpointException) as e:
            # torch's tensor writer reports a short write without its errno, so the free
            # space is said too: a full disk is the usual cause
            free = shutil.disk_usage(self.root).free / 2**30
            raise store.CheckpointError(
                f"checkpoint of step {step} failed ({_cause(e)}; {free:.1f} GiB free in "
                f"{self.root}); newest complete checkpoint: {store.newest(self.root) or 'none'}"
            ) from None

    def _write_and_seal(self, step: int, entries: Entries, meta: dict, config_text: str) -> None:
        tmp = store.step_dir(self.root, step).with_name(f"step_{step:07d}.tmp")
        if self.topo.is_main:
            store.remove_stale(tmp)
            tmp.mkdir(parents=True)
            (tmp / "config.yaml").write_text(config_text)
        if self.distributed:
            dist.barrier(group=self.group)
        writer = dcp.FileSystemWriter(tmp, single_file_per_rank=True, sync_files=True)
        dcp.save(entries, storage_writer=writer, process_group=self.group,
                 no_dist=not self.distributed)
        rank = dist.get_rank(self.group) if self.distributed else 0
        mine = {f.name: store.describe(f) for f in tmp.glob(f"__{rank}_*.distcp")}
        files = {k: v for part in self._all_gather(mine) for k, v in part.items()}
        if self.topo.is_main:
            files[".metadata"] = store.describe(tmp / ".metadata")
            self.last = store.seal(tmp, {**meta, "files": files})
            for old in store.prune(self.root, self.keep_last, self.last):
                self.log(f"checkpoint: removed {old} (train.keep_last={self.keep_last})")
            self.log(f"checkpoint: saved {self.last}")
        else:
            self.last = store.step_dir(self.root, step)

    def load(self, path: Path, entries: Entries) -> None:
        """Fill `entries` from a sealed checkpoint, after every rank checked a share of its
        files against the record (sizes and CRC-32): a damaged file is named, not unpickled."""
        self.wait()
        files = sorted(store.read_meta(path).get("files", {}).items())
        rank, world = ((dist.get_rank(self.group), dist.get_world_size(self.group))
                       if self.distributed else (0, 1))
        errors = [e for part in self._all_gather(store.verify(path, dict(files[rank::world])))
                  for e in part]
        if errors:
            raise store.CheckpointError(errors[0])
        try:
            dcp.load(entries, storage_reader=SafeReader(path), planner=SafeLoadPlanner(),
                     process_group=self.group, no_dist=not self.distributed)
        except store.CheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures
            raise store.CheckpointError(f"{path}: cannot load ({_cause(e)})") from None

    def tidy(self, resumed: Path | None, damaged: list[Path] = ()) -> None:
        """Once every rank has loaded (rank 0): remove what crashed saves left, and set aside
        -- renamed, never deleted -- the `damaged` checkpoints and those newer than `resumed`
        in this root (another trajectory: left in place, `--resume auto` would pick them and
        pruning would mix the two)."""
        if self.distributed:
            dist.barrier(group=self.group)
        if not self.topo.is_main:
            return
        for d in store.incomplete(self.root):
            self.log(f"checkpoint: warning: removing incomplete {d} (a save did not finish)")
            store.remove_stale(d)
        for d in damaged:
            self.log(f"checkpoint: warning: set aside damaged {d} as {store.set_aside(d, 'damaged')}")
        if resumed is not None and resumed.parent.resolve() == self.root.resolve():
            for d in store.complete_checkpoints(self.root):
                if store.step_of(d) > store.step_of(resumed):
                    self.log(f"checkpoint: resumed from the older {resumed.name}: set aside "
                             f"{d.name} as {store.set_aside(d, 'superseded').name}")

    def close(self) -> None:
        self.wait()
        if self.executor is not None:
            self.executor.shutdown()
