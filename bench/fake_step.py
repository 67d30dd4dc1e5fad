"""`pretrain plan --fake` over the large shipped configs at their planned layouts: the real
step under fake tensors (pretrain/planning/fake_step.py) beside the planner (pretrain/planning/planner.py).

Run: `python -m bench.fake_step [--only NAME]` (minutes on a CPU: each layout builds the model
at full size under fake tensors and runs two steps per pipeline stage). Each row: the fullest
stage's peak GiB against the planner's total, executed FLOPs against the planner's, collective
bytes against the planner's communication model. Micro-batches per step are cut to the fewest
the layout allows (memory does not grow with them: gradients accumulate in place), and the
planner is asked about the same count.
"""

from __future__ import annotations

import argparse
import gc
from pathlib import Path

from pretrain.config import load_config
from pretrain.planning.hardware import GPUS
from pretrain.planning.plan_check import check_layout

ROOT = Path(__file__).resolve().parents[1]


def _layout(tp=1, pp=1, dp=1, zero=0, mb=1, m=2) -> list[str]:
    return [f"parallel.tensor={tp}", f"parallel.pipeline={pp}", f"parallel.data={dp}",
            f"parallel.zero_stage={zero}", f"parallel.sequence_parallel={str(tp > 1).lower()}",
            f"train.micro_batch_size={mb}", f"train.grad_accum_steps={m}"]


ROWS = {
    # one GPU, the comparison
    "ouro-1.4b 1 GPU": ("configs/ouro-1.4b.yaml", _layout()),
    # `pretrain plan --config configs/ouro-1.4b.yaml --gpus 64`'s first row (DP 64, mb 2, ZeRO-1)
    "ouro-1.4b 64 GPUs (plan)": ("configs/ouro-1.4b.yaml", _layout(dp=64, zero=1, mb=2)),
    "ouro-1.4b TP 2 x DP 32": ("configs/ouro-1.4b.yaml", _layout(tp=2, dp=32)),
    "ouro-1.4b PP 2 x DP 32": ("configs/ouro-1.4b.yaml", _layout(pp=2, dp=32, m=4)),
    "ouro-2.6b 1 GPU": ("configs/ouro-2.6b.yaml", _layout()),
    "flt-flt-k12 DP 8": ("configs/flt-flt-k12.yaml", _layout(dp=8, mb=8)),
    # sampled R: the fake step runs step 1's draw, the planner the mean (FLOPs) and the window
    "huginn-3.5b (sampled R, k 8) DP 8": ("configs/huginn-3.5b.yaml", _layout(dp=8)),
    # the same at R fixed to the sampler's mean (32): both sides at one R
    "huginn-3.5b (R 32, k 8) DP 8": ("configs/huginn-3.5b.yaml",
                                     [*_layout(dp=8), "recurrence.sampler=fixed"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=sorted(ROWS), action="append")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    args = ap.parse_args()
    print("| config, layout | fake peak GiB | planner GiB | memory | FLOPs | collective bytes "
          "| ops per step |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only or ROWS:
        path, layout = ROWS[name]
        check = check_layout(load_config(str(ROOT / path), layout), GPUS[args.gpu])
        comm = "none" if check.comm_ratio is None else f"{check.comm_ratio:.3f}"
        print(f"| {name} | {check.peak_bytes / 2**30:.2f} | {check.plan.memory_gb['total']:.2f} "
              f"| {check.memory_ratio:.3f} | {check.flops_ratio:.3f} | {comm} "
              f"| {max(s.ops for s in check.stages):,} |", flush=True)
        del check
        gc.collect()


if __name__ == "__main__":
    main()
