"""Checkpoint I/O: sharded save/load throughput against raw disk bandwidth, and the step-time
stall of async saves.

Run: `python -m bench.checkpoint_io [--params 500e6]`.
1. Under torchrun with 2 ranks, each rank holds half of a random fp32 state of `--params`
   parameters. Measured side by side on the same disk, in the same run:
     raw write: every rank writes its bytes to one file (64 MiB writes, fsync) -- `dd`-style;
     save:      our Checkpointer (DCP shards + CRC-32 + sealing with fsync and rename);
     raw read / load: the same bytes read back, from disk (the page cache is dropped first
               when we may: root), else from the page cache.
   Best of 5 interleaved rounds each, the page cache dropped before each (when root). Prints
   GB/s and the ratios save/raw-write and load/raw-read (goal >= 0.5). Load includes checking
   every file's CRC-32.
2. One process trains a 13M-parameter looped model for the same steps three ways: no
   checkpoints, a synchronous checkpoint every 5 steps, an async one every 5 steps; prints the
   step-time stall of each against the run without checkpoints (goal for async <= 5%), once
   with one compute thread (the other core free for the writer, as a GPU node's CPU is) and
   once with compute on both cores, where the background writer can only take compute time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from bench.torchrun_self import torchrun_self

ROOT = Path(__file__).resolve().parents[1]

CHUNK = 1 << 26  # bytes per raw write
ROUNDS = 5


def _timed(fn, barrier) -> float:
    barrier()
    tick = time.perf_counter()
    fn()
    barrier()
    return time.perf_counter() - tick


def _raw_write(path: Path, tensors: list[torch.Tensor]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for t in tensors:
            view = memoryview(t.numpy()).cast("B")
            for i in range(0, len(view), CHUNK):
                os.write(fd, view[i:i + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def _raw_read(path: Path, tensors: list[torch.Tensor]) -> None:
    with open(path, "rb", buffering=0) as fh:
        for t in tensors:
            view = memoryview(t.numpy()).cast("B")
            for i in range(0, len(view), CHUNK):
                fh.readinto(view[i:i + CHUNK])


def _drop_caches(rank: int, barrier) -> bool:
    """Empty the page cache (root only) so reads come from the disk, not from memory."""
    ok = False
    if rank == 0:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            ok = True
        except OSError:
            pass
    barrier()
    return ok


def worker(params: float, out: Path) -> None:
    import torch.distributed as dist

    from parallelism.topology import Topology
    from pretrain.checkpoint.checkpointer import Checkpointer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = int(params) // world
    pieces = 16
    g = torch.Generator().manual_seed(rank)
    tensors = [torch.randn(per_rank // pieces, generator=g) for _ in range(pieces)]
    entries = {f"model/rank{rank}/piece{i}": t for i, t in enumerate(tensors)}
    nbytes = sum(t.numel() * 4 for t in tensors) * world
    work = out / "work"
    ckpt = Checkpointer(work / "checkpoints", Topology(world=world, rank=rank), keep_last=1,
                        log=lambda _: None)
    raw = work / f"raw_{rank}.bin"
    work.mkdir(parents=True, exist_ok=True)
    barrier = dist.barrier
    back = [torch.empty_like(t) for t in tensors]
    targets = {k: torch.empty_like(v) for k, v in entries.items()}
    best = {"raw_write": 1e9, "save": 1e9, "raw_read": 1e9, "load": 1e9}
    for step in range(1, ROUNDS + 1):  # interleaved rounds, best of each: the VM is noisy
        _drop_caches(rank, barrier)  # every timed operation starts from the same page cache
        took = {"raw_write": _timed(lambda: _raw_write(raw, tensors), barrier)}
        _drop_caches(rank, barrier)
        took |= {
            "save": _timed(lambda s=step: ckpt.save(s, entries, {"step": s, "layout": {}}, ""),
                           barrier),
            "cold": _drop_caches(rank, barrier),
            "raw_read": _timed(lambda: _raw_read(raw, back), barrier),
            "cold_load": _drop_caches(rank, barrier),
            "load": _timed(lambda s=step: ckpt.load(work / f"checkpoints/step_{s:07d}", targets),
                           barrier),
        }
        best = {k: min(v, took[k]) for k, v in best.items()}
        cold = took["cold"]
        assert all(torch.equal(targets[k], v) for k, v in entries.items())
    if rank == 0:
        gb = nbytes / 1e9
        (out / "io.json").write_text(json.dumps({"gb": gb, "cold": cold,
                                                 **{k: gb / v for k, v in best.items()}}))
    dist.barrier()
    dist.destroy_process_group()


def stall(threads: int, steps: int = 25, every: int = 5) -> dict:
    """Wall time of `steps` training steps with a checkpoint after every `every`-th (but the
    last), against none: what the step loop loses. The wait for the last save is excluded
    (it is the exit's, not a step's)."""
    from pretrain.train import Trainer
    from tests.conftest import tiny_config

    shape = ["model.hidden_size=512", "model.num_layers=4", "model.num_heads=8",
             "model.num_kv_heads=8", "model.ffn_hidden_size=1408", "model.vocab_size=512",
             "model.loops=2", "train.seq_len=64", "train.micro_batch_size=8",
             "optim.warmup_steps=0", f"train.max_steps={steps + 1}"]
    times: dict[str, float] = {}
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("none", "sync", "async", "none_again"):  # none twice: the noise level
            cfg = tiny_config(*shape, f"train.async_checkpoint={name == 'async'}",
                              out_dir=Path(tmp) / name)
            trainer = Trainer(cfg, log=lambda _: None, tensorboard=False)
            trainer.train_step()  # warm-up outside the timing
            tick = time.perf_counter()
            for step in range(1, steps + 1):
                trainer.train_step()
                if not name.startswith("none") and step % every == 0 and step < steps:
                    trainer.save_checkpoint()
            times[name] = time.perf_counter() - tick
            trainer.checkpointer.close()
        params = sum(p.numel() for p in trainer.model.parameters())
    base = (times["none"] + times["none_again"]) / 2
    return {"params": params, "steps": steps, "every": every,
            **{f"{k}_s": v for k, v in times.items()},
            "noise": abs(times["none"] - times["none_again"]) / base,
            "sync_stall": times["sync"] / base - 1, "async_stall": times["async"] / base - 1}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=500e6)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    args = ap.parse_args()
    if "LOCAL_RANK" in os.environ:  # relaunched: the settings come through the environment
        worker(float(os.environ["CKPT_BENCH_PARAMS"]), Path(os.environ["CKPT_BENCH_DIR"]))
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        os.environ.update(CKPT_BENCH_DIR=tmp, CKPT_BENCH_PARAMS=str(args.params))
        res = torchrun_self(__spec__.name, 2, 29655, capture=True)
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        io = json.loads((Path(tmp) / "io.json").read_text())
    print(f"state: {io['gb']:.2f} GB over 2 ranks (random fp32, ~{args.params / 1e6:.0f}M params)")
    print(f"  raw write {io['raw_write']:.2f} GB/s | save {io['save']:.2f} GB/s | "
          f"ratio {io['save'] / io['raw_write']:.2f} (goal >= 0.5)")
    where = "from disk (page cache dropped)" if io["cold"] else "from the page cache (not root)"
    print(f"  reads {where}: raw read {io['raw_read']:.2f} GB/s | load {io['load']:.2f} GB/s | "
          f"ratio {io['load'] / io['raw_read']:.2f}; load / raw write {io['load'] / io['raw_write']:.2f} "
          "(goal >= 0.5)")
    for threads, what in ((1, "compute on 1 core, 1 core free (a GPU node's idle CPU)"),
                          (2, "compute on both cores (the writer competes with compute)")):
        s = stall(threads)
        print(f"step-time stall, {s['params'] / 1e6:.1f}M-param model, {s['steps']} steps, a "
              f"checkpoint every {s['every']}, {what}: sync {100 * s['sync_stall']:+.1f}% | "
              f"async {100 * s['async_stall']:+.1f}% (goal <= 5%); no-checkpoint runs differ by "
              f"{100 * s['noise']:.1f}%")


if __name__ == "__main__":
    main()
