"""Optimizer-state and gradient bytes per rank under ZeRO stages 0/1/2 and DP in {1, 2, 4}.

Run: `python -m bench.zero_memory` (re-launches itself under torchrun for each DP size; gloo on
CPU). Measured at the moment the optimizer steps (gradients reduced, states allocated):
  state bytes:    Adam's exp_avg + exp_avg_sq held by the rank; ideal 8 N / DP for ZeRO-1/2
                  (8 N unsharded, stage 0);
  gradient bytes: every gradient tensor the rank holds for the update (param.grad, and
                  DeepSpeed's partitioned gradient buffers); ideal 4 N / DP for ZeRO-2, 4 N else.
N = parameters of the model (fp32). Prints measured / ideal.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.torchrun_self import torchrun_self

ROOT = Path(__file__).resolve().parents[1]

SHAPE = ["model.hidden_size=256", "model.num_layers=4", "model.num_heads=4",
         "model.num_kv_heads=4", "model.ffn_hidden_size=704", "model.vocab_size=512",
         "model.loops=2", "train.seq_len=64", "train.micro_batch_size=2",
         "optim.warmup_steps=0", "train.max_steps=2"]


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def measure(stage: int, dp: int, topo, tmp: str) -> dict:
    from parallelism.zero import optimizer_state_bytes
    from pretrain.config import load_config
    from pretrain.train import Trainer

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        *SHAPE, f"parallel.data={dp}", f"parallel.zero_stage={stage}",
        f"data.paths=[{ROOT / 'data/sample.txt'}]", f"train.out_dir={tmp}"])
    trainer = Trainer(cfg, topology=topo, log=lambda _: None, tensorboard=False)
    opt = trainer.optimizer
    seen = {}
    real_step = opt.step

    def step(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters()]
        grads += list(getattr(opt, "averaged_gradients", {}).values()) and [
            g for gs in opt.averaged_gradients.values() for g in (gs or [])]
        seen["grad"] = _tensor_bytes(grads)
        out = real_step(*args, **kwargs)
        seen["state"] = (optimizer_state_bytes(trainer.engine.zero) if trainer.engine.zero is not None
                         else _tensor_bytes(t for s in opt.state.values() for t in s.values()
                                            if torch.is_tensor(t) and t.dim() > 0))
        return out

    opt.step = step
    trainer.train_step()
    n = sum(p.numel() for p in trainer.model.parameters())
    return {"n": n, **seen}


def worker() -> None:
    from parallelism.topology import init_topology, shutdown
    from pretrain.config import load_config

    dp = int(os.environ["WORLD_SIZE"])
    with tempfile.TemporaryDirectory() as tmp:
        topo = init_topology(load_config(ROOT / "configs/tiny.yaml",
                                         [*SHAPE, f"parallel.data={dp}"]))
        rows = {stage: measure(stage, dp, topo, tmp) for stage in (0, 1, 2)}
        if topo.rank == 0:
            print("RESULT " + json.dumps({"dp": dp, "rows": rows}), flush=True)
        shutdown(topo)


def main() -> None:
    results = []
    for dp in (1, 2, 4):
        out = torchrun_self(__spec__.name, dp, 29760 + dp, capture=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"dp={dp} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
        results.append(json.loads(line[0][len("RESULT "):]))
    print("DP stage | params N | state MB/rank  ideal  ratio | grad MB/rank  ideal  ratio")
    for r in results:
        dp = r["dp"]
        for stage, row in sorted(r["rows"].items()):
            n = row["n"]
            ideal_state = 8 * n / (dp if int(stage) else 1)
            ideal_grad = 4 * n / (dp if int(stage) == 2 else 1)
            print(f"{dp:>2} {stage:>5} | {n:>8,} | {row['state'] / 1e6:12.3f} "
                  f"{ideal_state / 1e6:6.3f} {row['state'] / ideal_state:6.3f} | "
                  f"{row['grad'] / 1e6:11.3f} {ideal_grad / 1e6:6.3f} {row['grad'] / ideal_grad:6.3f}")


if __name__ == "__main__":
    if "RANK" in os.environ:
        worker()
    else:
        main()
