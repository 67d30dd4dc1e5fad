"""The GPU acceptance run, one script for a short, offline GPU lease (15 minutes, all tries):

  1. `pretrain doctor` (the node's versions and the verdict);
  2. the whole CUDA test tier (`pytest -m cuda tests/`);
  3. training throughput at the planner's best single-GPU layout -- Ouro-1.4B R = 4 at a 4k
     context (the stage-1 config) and an FLT config: tokens/s, MFU and memory (peak allocated
     and reserved), each beside the planner's prediction and the ratio (steps timed after
     warm-up steps, as many as the case's budget allows; the data is the bundled text as byte
     ids: throughput does not depend on which tokens they are);
  4. decoding tokens/s of the trained model under each KV cache policy, in bf16.
Every part runs in a child process under its own time budget (BUDGETS, 7 minutes in all, so
the whole run fits 8): a timeout or a crash becomes that part's row, one line, and the run
goes on. The JSON file is rewritten after every part, so a run cut short keeps what finished.

  python -m bench.gpu_acceptance --out results.json [--steps 20]
  python -m bench.gpu_acceptance --dry-run --out x.json   # the same path on CPU, tiny shapes
The dry run (tests/test_gpu_acceptance.py) predicts for an H100 while it measures a CPU: its
ratios mean nothing, its purpose is that the script cannot rot between GPU leases.
bench/gpu_acceptance.sh wraps it for the lease (packages the image lacks, no index).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pretrain.config import load_config
from pretrain.model.generate import ExitRule, generate
from pretrain.planning.hardware import GPUS, lookup, memory_gb
from pretrain.planning.planner import Layout, estimate, plan, realising_config

ROOT = Path(__file__).resolve().parents[1]
CASES = {"ouro-1.4b R=4 4k": ("configs/ouro-1.4b-stage1a.yaml", ["model.loops=4"]),
         "flt K=6": ("configs/flt-flt-k6.yaml", [])}
DRY_CASES = {"tiny ouro R=4": ("configs/tiny.yaml", ["model.loops=4"]),
             "tiny flt K=6": ("configs/flt-cpu-flt.yaml", ["train.micro_batch_size=2"])}
# seconds per part (a child process each, killed at its budget); 420 s in all, within 8 minutes
BUDGETS = {"doctor": 30, "cuda tier": 170, "case": 110}
KV_POLICIES = ("full", "last", "average")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _config(path: str, overrides: list[str], out_dir: str):
    """The case's config, training on the bundled text as byte ids (no tokenizer, no held-out
    data, no checkpoints)."""
    return load_config(ROOT / path, [*overrides, "data.source=text", "data.tokenizer=''",
                                     f"data.paths=[{ROOT / 'data/sample.txt'}]",
                                     "data.validation=[]", "train.eval_every=0",
                                     f"train.out_dir={out_dir}"])


def _planner_gpu(dry: bool):
    return GPUS["h100"] if dry else lookup(torch.cuda.get_device_name())


def throughput(name: str, dry: bool, steps: int, warmup: int, budget_s: float) -> dict:
    """Train `warmup` steps, then timed steps until `steps` or the budget; measured vs the
    planner's prediction, then decoding in bf16 (the row)."""
    from pretrain.train import Trainer

    start = time.perf_counter()
    path, overrides = (DRY_CASES if dry else CASES)[name]
    gpu = _planner_gpu(dry)
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = _config(path, overrides, out_dir)
        batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
        if dry:  # the config's own small layout, predicted as is
            est = estimate(cfg, Layout(1, 1, 1, cfg.train.micro_batch_size,
                                       cfg.train.grad_accum_steps), gpu, batch)
        else:  # the planner's best single-GPU layout, run as it says
            est = next((e for e in plan(cfg, 1, gpu, batch) if e.feasible), None)
            if est is None:
                return {"error": f"the planner finds no layout of 1 {gpu.name} that fits"}
            cfg = _config(path, [*overrides, *realising_config(cfg, est.layout)], out_dir)
        trainer = Trainer(cfg, log=None, tensorboard=False)
        for _ in range(warmup):
            trainer.train_step()
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        _sync(trainer.device)
        done, tick = 0, time.perf_counter()
        while done < steps:  # leave a third of the budget for decoding and teardown
            trainer.train_step()
            done += 1
            _sync(trainer.device)
            if time.perf_counter() - start > budget_s * 2 / 3:
                break
        seconds = time.perf_counter() - tick
    tokens_per_s = done * trainer.tokens_per_step / seconds
    mfu = None if trainer.peak_flops is None else \
        trainer.flops_per_token(trainer.step - 1) * tokens_per_s / trainer.peak_flops
    memory = memory_gb(trainer.device) if trainer.device.type == "cuda" else {}
    row = {"config": path, "overrides": overrides, "layout": realising_config(cfg, est.layout),
           "timed_steps": done, "tokens_per_s": tokens_per_s,
           "predicted_tokens_per_s": est.tokens_per_s, "mfu": mfu, "predicted_mfu": est.mfu,
           "peak_allocated_gib": memory.get("peak_memory_gb"),
           "peak_reserved_gib": memory.get("peak_reserved_gb"),
           "predicted_memory_gib": est.memory_gb["total"],
           "ratio_tokens_per_s": tokens_per_s / est.tokens_per_s,
           "ratio_mfu": None if mfu is None else mfu / est.mfu}
    if row["peak_allocated_gib"]:
        row["ratio_memory"] = row["peak_allocated_gib"] / row["predicted_memory_gib"]
    model, device = trainer.model, trainer.device
    del trainer
    gc.collect()
    row["decode_tokens_per_s"] = decoding(model, device, *((16, 4, 2) if dry else (512, 128, 8)))
    return row


def decoding(model, device: torch.device, prompt_len: int, new_tokens: int, batch: int) -> dict:
    """Greedy decoding tokens/s under each KV policy, bf16 autocast (as a served model runs)."""
    prompt = torch.randint(0, min(model.cfg.vocab_size, 256), (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        for policy in KV_POLICIES:
            generate(model, prompt, 2, rule=ExitRule("all"), kv_cache=policy)  # warm-up
            _sync(device)
            tick = time.perf_counter()
            generate(model, prompt, new_tokens, rule=ExitRule("all"), kv_cache=policy)
            _sync(device)
            out[policy] = batch * new_tokens / (time.perf_counter() - tick)
    return out


def child(cmd: list[str], budget_s: float) -> dict:
    """Run one part in a child process under its budget: its JSON row (the last stdout line),
    or the reason it has none -- a timeout or a failure -- in one line."""
    try:
        res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {budget_s:g} s (its budget)"}
    lines = res.stdout.strip().splitlines()
    if res.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except ValueError:
            pass
    tail = (res.stderr.strip().splitlines() or lines or ["no output"])[-1]
    return {"error": f"exit {res.returncode}: {tail[:300]}"}


def cuda_tier(budget_s: float) -> dict:
    """The whole CUDA tier (every test skips, with its reason, where no GPU is)."""
    code = ("import json, subprocess, sys; r = subprocess.run([sys.executable, '-m', 'pytest', "
            "'-q', '-m', 'cuda', '-p', 'no:randomly', '-rs', 'tests'], capture_output=True, "
            "text=True); print(r.stdout[-4000:], file=sys.stderr); print(json.dumps("
            "{'returncode': r.returncode, 'summary': r.stdout.strip().splitlines()[-1:]}))")
    return child([sys.executable, "-c", code], budget_s)


def doctor(budget_s: float) -> dict:
    code = ("import json; from pretrain.planning.doctor import diagnose, report; t, s = report(diagnose());"
            " print(json.dumps({'text': t, 'status': s}))")
    return child([sys.executable, "-c", code], budget_s)


def _device_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": "cpu"}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=20)
            info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info["driver"] = "unknown"
    return info


def _row_line(name: str, r: dict) -> str:
    if "error" in r:
        return f"{name:<20} | {r['error']}"
    mfu = "unknown" if r["mfu"] is None else \
        f"{100 * r['mfu']:5.1f}% ({100 * r['predicted_mfu']:5.1f}%, {r['ratio_mfu']:5.2f})"
    mem = "n/a" if r["peak_allocated_gib"] is None else \
        f"{r['peak_allocated_gib']:6.1f} / {r['peak_reserved_gib']:6.1f} " \
        f"({r['predicted_memory_gib']:6.1f}, {r['ratio_memory']:5.2f})"
    d = r["decode_tokens_per_s"]
    return (f"{name:<20} | {r['tokens_per_s']:>10,.0f} ({r['predicted_tokens_per_s']:>9,.0f}, "
            f"{r['ratio_tokens_per_s']:5.2f}) | {mfu} | {mem} | "
            + " / ".join(f"{d[p]:,.0f}" for p in KV_POLICIES))


class Results:
    """The run's JSON, rewritten (beside, then renamed) after every part."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, {**head, "cases": {}}
        self._write()

    def add(self, key: str, value: dict, case: bool = False) -> None:
        (self.data["cases"] if case else self.data)[key] = value
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _budget(text: str) -> tuple[str, float]:
    part, _, seconds = text.rpartition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if part not in BUDGETS or not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: PART=SECONDS, PART one of {sorted(BUDGETS)}")
    return part, value


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--steps", type=int, default=20, help="most timed training steps per case")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (see the docstring)")
    ap.add_argument("--budget", action="append", default=[], metavar="PART=SECONDS", type=_budget,
                    help="override one part's budget (doctor, cuda tier, case)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # the child that runs one case
    args = ap.parse_args(argv)
    budgets = {**BUDGETS, **dict(args.budget)}
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    if args.case:
        print(json.dumps(throughput(args.case, args.dry_run, steps, warmup, budgets["case"])))
        return 0
    if not args.out:
        ap.error("--out is required")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    gpu = _planner_gpu(args.dry_run)
    results = Results(Path(args.out), {"device": _device_info(), "dry_run": args.dry_run,
                                       "planner_gpu": None if gpu is None else gpu.name,
                                       "budgets_s": budgets})
    report = doctor(budgets["doctor"])
    results.add("doctor", report)
    print(report.get("text", report.get("error")), flush=True)
    tier = cuda_tier(budgets["cuda tier"])
    results.add("cuda_tier", tier)
    print(f"CUDA tier: {' '.join(tier.get('summary', [tier.get('error', '')]))}", flush=True)
    if gpu is None:
        print(f"gpu_acceptance: {torch.cuda.get_device_name()} is not in the planner's table "
              "(pretrain/planning/hardware.py): no throughput cases", file=sys.stderr)
        return 2
    print(f"{'case':<20} | {'tokens/s (pred, ratio)':>30} | {'MFU (pred, ratio)':>24} | "
          f"{'GiB alloc / reserved (pred, ratio)':>34} | decode tok/s full / last / average")
    for name in DRY_CASES if args.dry_run else CASES:
        cmd = [sys.executable, "-m", "bench.gpu_acceptance", "--case", name,
               f"--steps={args.steps}", f"--warmup={args.warmup}", f"--budget=case={budgets['case']}",
               *(["--dry-run"] if args.dry_run else [])]
        row = child(cmd, budgets["case"])
        results.add(name, row, case=True)
        print(_row_line(name, row), flush=True)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
