"""Data-parallel gradient reduction overlapped with backward (Megatron's --overlap-grad-reduce).

Trainable parameters are grouped into buckets of about `parallel.grad_bucket_mb`, in reverse
registration order (roughly the order backward finishes them). A post-accumulate-grad hook
counts each parameter's contributions; once every parameter of a bucket has received all of
the step's contributions, the bucket is flattened and all-reduced asynchronously while backward
goes on, and `finish` waits for what is still in flight before the optimizer step.

How many contributions a parameter gets in one step is a property of the schedule, not of the
parameter: one per backward call that reaches it -- m per step locally (one backward per
micro-batch); on a circular-pipeline stage one per piece whose graph uses it, so the shared
block's are complete only after its *last* lap's backward (lap 1 of the last micro-batch). The
schedule is the same every step, so the first step counts (reducing after backward, as without
overlap) and later steps launch each bucket at its count. A contribution that arrives after its
bucket was launched means the schedule changed: it raises instead of reducing a stale gradient.

Each element is summed and scaled the same way with or without overlap (a flat all-reduce of
its bucket, then * 1/dp), so weights match the run that reduces after backward bit for bit on 2
ranks (tests/test_grad_overlap.py, bench/grad_overlap.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallelism.timing import DeviceClock


class _Bucket:
    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        self.work: dist.Work | None = None
        self.flat: Tensor | None = None


class OverlappedGradReducer:
    """Average gradients over `group` (size `world`) bucket by bucket as backward produces them."""

    def __init__(self, model: nn.Module, group, world: int, bucket_mb: float,
                 overlap: bool = True):
        self.group, self.scale, self.overlap = group, 1.0 / world, overlap
        params = [p for p in model.parameters() if p.requires_grad]
        self.device = params[0].device if params else torch.device("cpu")
        self.buckets: list[_Bucket] = []
        current, size, limit = [], 0, bucket_mb * 2**20
        for p in reversed(params):
            current.append(p)
            size += p.numel() * p.element_size()
            if size >= limit:
                self.buckets.append(_Bucket(current))
                current, size = [], 0
        if current:
            self.buckets.append(_Bucket(current))
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.expected: dict[nn.Parameter, int] | None = None  # contributions per step
        self.seen: dict[nn.Parameter, int] = dict.fromkeys(params, 0)
        self._clock: DeviceClock | None = None  # times `finish` in the last step
        for p in params:
            p.register_post_accumulate_grad_hook(self._arrived)

    def _arrived(self, p: nn.Parameter) -> None:
        self.seen[p] += 1
        bucket = self.bucket_of[p]
        if bucket.work is not None:
            raise RuntimeError("a gradient arrived after its bucket was reduced: the backward "
                               "schedule changed between steps (overlap_grad_reduce)")
        if self.overlap and self.expected is not None and all(
                self.seen[q] == self.expected[q] for q in bucket.params):
            self._launch(bucket, async_op=True)

    def _launch(self, bucket: _Bucket, async_op: bool) -> None:
        grads = [p.grad for p in bucket.params if p.grad is not None]
        bucket.flat = torch.cat([g.flatten() for g in grads]) if grads else None
        if bucket.flat is not None:
            bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=async_op)

    def finish(self) -> None:
        """Reduce what was not launched, wait for every bucket, write the averages back."""
        self._clock = clock = DeviceClock(self.device)
        clock.start()
        for bucket in self.buckets:
            if bucket.work is None and bucket.flat is None:
                self._launch(bucket, async_op=True)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                flat = bucket.flat.mul_(self.scale)
                grads = [p.grad for p in bucket.params if p.grad is not None]
                for g, new in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                    g.copy_(new.view_as(g))
            bucket.work = bucket.flat = None
        clock.stop()
        if self.expected is None:
            self.expected = dict(self.seen)
        self.seen = dict.fromkeys(self.seen, 0)

    @property
    def exposed_s(self) -> float:
        """Seconds `finish` took in the last step: the reduction backward did not hide (device
        time on CUDA, where waiting on NCCL only holds the stream)."""
        return 0.0 if self._clock is None else self._clock.busy_s()
