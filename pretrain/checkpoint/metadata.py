"""Reading a checkpoint's DCP metadata without running code from it.

torch.distributed.checkpoint's FileSystemReader unpickles `.metadata` with the plain pickle
module: a crafted file (a `__reduce__` returning os.system, say) runs when any command opens
the checkpoint -- export, generate, eval, convert, grow, train --resume -- before its sizes and
CRCs are checked (and those come from the same directory). `SafeReader` unpickles it with an
allow-list of exactly what DCP writes: its metadata dataclasses, torch.Size, dtypes, the layout
and memory-format encodings, and a pathlib path; anything else is refused, in one line naming
the file and the global it asked for. Every storage location must be one of the checkpoint's
own `__R_N.distcp` files (no path, no `..`; `store.verify` refuses a link among them). A bytes
entry (DeepSpeed's optimizer state holds some) DCP would `torch.load(weights_only=False)` --
an attacker's pickle; `SafeLoadPlanner` loads it with `weights_only=True`: tensors and plain
values, nothing that runs.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import ReadItem

from pretrain.checkpoint.store import CheckpointError

_SHARD = re.compile(r"__\d+_\d+\.distcp")
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "ChunkStorageMetadata",
        "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties",
        "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file, where: Path):
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise CheckpointError(f"{self.where}: refused: it asks for {module}.{name}, which DCP "
                              "metadata never holds (a crafted or foreign file)")


def read_metadata(where: Path) -> Metadata:
    """The DCP metadata file `where` (a checkpoint's `.metadata`), unpickled through the
    allow-list."""
    try:
        with open(where, "rb") as fh:
            md = _MetadataUnpickler(fh, where).load()
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{where}: unreadable ({e.__class__.__name__}: {e})") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{where}: not DCP metadata (holds a {type(md).__name__})")
    shard_bytes = {}
    for info in (md.storage_data or {}).values():
        path = getattr(info, "relative_path", None)
        if not isinstance(path, str) or not _SHARD.fullmatch(path):
            raise CheckpointError(f"{where}: refused: storage path {path!r} is not one of the "
                                  "checkpoint's own __R_N.distcp files")
        if path not in shard_bytes:
            f = where.parent / path
            shard_bytes[path] = f.lstat().st_size if f.is_file() else 0
        span = (getattr(info, "offset", None), getattr(info, "length", None))
        if not all(_count(x) for x in span):
            raise CheckpointError(f"{where}: a storage span {span} of {path} is not a count")
        if sum(span) > shard_bytes[path]:
            raise CheckpointError(f"{where.parent / path}: .metadata places bytes up to "
                                  f"{sum(span)} in it, it holds {shard_bytes[path]} (truncated?)")
    total = sum(shard_bytes.values())
    for name, entry in md.state_dict_metadata.items():
        if isinstance(entry, TensorStorageMetadata):
            _check_tensor(where, name, entry, total)
    return md


def _count(x) -> bool:
    return type(x) is int and x >= 0


def _check_tensor(where: Path, name, entry: TensorStorageMetadata, total: int) -> None:
    """Sizes that are counts, chunks inside the tensor, and a tensor no larger than the shard
    files that must hold it (a size of 10^13 would be allocated before any read)."""
    size, dtype = tuple(entry.size), getattr(entry.properties, "dtype", None)
    if not all(_count(n) for n in size) or not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"{where}: entry {name!r}: size {size} / dtype {dtype!r} is not a "
                              "tensor's")
    nbytes = math.prod(size) * dtype.itemsize
    if nbytes > total:
        raise CheckpointError(f"{where}: entry {name!r} of size {size} needs {nbytes:,} bytes; "
                              f"the checkpoint's shard files hold {total:,}")
    for chunk in entry.chunks:
        offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
        if (len(offsets) != len(size) or len(sizes) != len(size)
                or not all(_count(x) for x in offsets + sizes)
                or any(o + n > dim for o, n, dim in zip(offsets, sizes, size, strict=True))):
            raise CheckpointError(f"{where}: entry {name!r}: a chunk at {offsets} of size "
                                  f"{sizes} lies outside its size {size}")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner with bytes entries unpickled by `torch.load(weights_only=True)`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:  # weights_only refuses any other global: UnpicklingError
            raise CheckpointError(f"checkpoint entry {fqn!r}: refused: its bytes hold more than "
                                  f"tensors and plain values ({str(e).splitlines()[0]})") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


class SafeReader(dcp.FileSystemReader):
    """DCP's filesystem reader with `read_metadata` through the allow-list."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        md = read_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md
