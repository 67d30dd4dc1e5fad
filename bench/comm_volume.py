"""Tensor-parallel communication per training step and rank, measured vs the analytic minimum.

Run: `python -m bench.comm_volume` (re-launches itself under torchrun with 2 gloo processes).
Every collective of one training step is counted by wrapping torch.distributed.all_reduce and
megatron-core's all-gather / reduce-scatter entry points; bytes are payloads (the all-reduced
tensor, the all-gather output, the reduce-scatter input; ring traffic on the wire is a fixed
multiple of these for both sides). The analytic minimum, with L = N*R + prelude + coda*R layer
applications and X = B*S*H*4 bytes:
  TP:     per layer 2 all-reduces forward + 2 backward (4X); embedding 1 all-reduce forward;
          LM head 1 all-reduce backward per loop step; vocab-parallel CE 3 all-reduces of B*S
          floats per loop step; grad norm 1 scalar (fp64); the skip-step vote 1 scalar.
  TP+SP:  per layer 4 all-gathers + 4 reduce-scatters of X (same volume as 4 all-reduces);
          embedding 1 reduce-scatter forward + 1 all-gather backward; LM head 1 all-gather
          forward + 1 reduce-scatter backward per loop step; exit gate 1 all-gather of B*S
          floats per step; CE as above; one all-reduce of the sequence-parallel (norm + gate)
          gradients; the two scalars.
          megatron-core's SP keeps only the local sequence shard of each column-parallel input
          and all-gathers it again in backward for the weight gradient (activation memory / tp
          for 1 extra all-gather of X): +2X per layer and +X per LM head step. Both ratios are
          printed.
Goal: measured / analytic = 1.00.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

from bench.torchrun_self import torchrun_self

ROOT = Path(__file__).resolve().parents[1]

SHAPE = ["model.hidden_size=256", "model.num_layers=2", "model.num_heads=4",
         "model.num_kv_heads=4", "model.ffn_hidden_size=704", "model.vocab_size=1024",
         "model.loops=3", "model.max_seq_len=128", "train.seq_len=128",
         "train.micro_batch_size=4", "optim.warmup_steps=0", "train.max_steps=10"]


def count_collectives(counts: Counter):
    """Patch the collectives one step uses; returns a function that undoes the patch."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import layers, mappings

    saved = [(dist, "all_reduce", dist.all_reduce)]
    saved += [(m, n, getattr(m, n)) for m in (mappings, layers)
              for n in ("dist_all_gather_func", "dist_reduce_scatter_func")]

    def wrap(op, fn, which):
        def counted(*args, **kwargs):
            t = args[which]
            counts[op] += t.numel() * t.element_size()
            return fn(*args, **kwargs)
        return counted

    dist.all_reduce = wrap("all_reduce", dist.all_reduce, 0)
    for m in (mappings, layers):
        m.dist_all_gather_func = wrap("all_gather", m.dist_all_gather_func, 0)  # output
        m.dist_reduce_scatter_func = wrap("reduce_scatter", m.dist_reduce_scatter_func, 1)  # input

    def undo():
        for mod, name, fn in saved:
            setattr(mod, name, fn)
    return undo


def analytic(cfg, sp: bool, regather: bool = False) -> Counter:
    m, t = cfg.model, cfg.train
    r = m.loops
    layers = m.num_layers * r + m.prelude_layers + m.coda_layers * r
    x = t.micro_batch_size * t.seq_len * m.hidden_size * 4
    bs = t.micro_batch_size * t.seq_len * 4
    want = Counter({"all_reduce": 3 * bs * r + 8 + 4})  # CE, grad norm (fp64), skip vote
    if not sp:
        want["all_reduce"] += 4 * layers * x + x + r * x
        return want
    n_norms = 4 if m.sandwich_norm else 2
    sp_params = (n_norms * (m.num_layers + m.prelude_layers + m.coda_layers) + 1) * m.hidden_size
    want["all_reduce"] += (sp_params + m.hidden_size + 1) * 4  # + gate weight and bias
    want["all_gather"] = 4 * layers * x + x + r * x + r * bs
    want["reduce_scatter"] = 4 * layers * x + x + r * x
    if regather:
        want["all_gather"] += 2 * layers * x + r * x
    return want


def worker() -> None:
    from parallelism.topology import init_topology
    from pretrain.config import load_config
    from pretrain.train import Trainer

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sp in (False, True):
            cfg = load_config(ROOT / "configs/tiny.yaml", [
                *SHAPE, "parallel.tensor=2", f"parallel.sequence_parallel={str(sp).lower()}",
                f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={tmp}"])
            trainer = Trainer(cfg, topology=init_topology(cfg), log=lambda _: None,
                              tensorboard=False)
            trainer.train_step()  # warm-up
            counts = Counter()
            undo = count_collectives(counts)
            trainer.train_step()
            undo()
            rows.append((sp, counts, analytic(cfg, sp), analytic(cfg, sp, regather=sp)))
    if int(os.environ["RANK"]) == 0:
        for sp, got, minimum, design in rows:
            name = "TP=2 + SP" if sp else "TP=2     "
            total = sum(got.values())
            ops = ", ".join(f"{op} {got[op] / 1e6:.3f}/{design[op] / 1e6:.3f} MB"
                            for op in sorted(set(got) | set(design)))
            print(f"{name}: measured {total / 1e6:7.3f} MB/step/rank | vs analytic minimum "
                  f"{sum(minimum.values()) / 1e6:7.3f} MB: {total / sum(minimum.values()):.3f} | "
                  f"vs minimum + megatron wgrad re-gathers {sum(design.values()) / 1e6:7.3f} MB: "
                  f"{total / sum(design.values()):.3f} ({ops})")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        sys.exit(torchrun_self(__spec__.name, 2, 29731))
