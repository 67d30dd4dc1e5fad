"""The GPU acceptance run (issue 26), one script for a short, offline GPU lease:

  1. `pretrain doctor` (the node's versions and the verdict);
  2. the CUDA test tier (`pytest -m cuda`);
  3. training throughput at the planner's best single-GPU settings -- Ouro-1.4B R = 4 at a 4k
     context (the stage-1 config) and an FLT config: tokens/s, MFU and peak memory, each beside
     the planner's prediction and the ratio (steps timed after warm-up steps; the data is the
     bundled text as byte ids: throughput does not depend on which tokens they are);
  4. decoding tokens/s under each KV cache policy.
One summary table on stdout and a JSON file.

  python bench/gpu_acceptance.py --out results.json [--steps 20]
  python bench/gpu_acceptance.py --dry-run --out x.json   # the same path on CPU, tiny shapes
The dry run (tests/test_gpu_acceptance.py) predicts for an H100 while it measures a CPU: its
ratios mean nothing, its purpose is that the script cannot rot between GPU leases.
bench/gpu_acceptance.sh wraps it for the lease (wheelhouse install, time limit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pretrain.config import load_config  # noqa: E402
from pretrain.doctor import diagnose, report  # noqa: E402
from pretrain.hardware import GPUS, lookup  # noqa: E402
from pretrain.model.generate import ExitRule, generate  # noqa: E402
from pretrain.planner import Layout, estimate, plan, realising_config  # noqa: E402
from pretrain.train import Trainer  # noqa: E402

CASES = {"ouro-1.4b R=4 4k": ("configs/ouro-1.4b-stage1a.yaml", ["model.loops=4"]),
         "flt K=6": ("configs/flt-flt-k6.yaml", [])}
DRY_CASES = {"tiny ouro R=4": ("configs/tiny.yaml", ["model.loops=4"]),
             "tiny flt K=6": ("configs/flt-cpu-flt.yaml", ["train.micro_batch_size=2"])}
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


def throughput(name: str, path: str, overrides: list[str], gpu, steps: int, warmup: int,
               dry: bool, out_dir: str) -> tuple[dict, Trainer | None]:
    """Train `steps` timed steps after `warmup` ones; measured vs the planner's prediction
    (the row), and the trainer (its model decodes next; None when nothing fits)."""
    cfg = _config(path, overrides, out_dir)
    batch = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    if dry:  # the config's own small layout, predicted as is
        lay = Layout(1, 1, 1, cfg.train.micro_batch_size, cfg.train.grad_accum_steps)
        est = estimate(cfg, lay, gpu, batch)
    else:  # the planner's best single-GPU layout, run as it says
        est = next((e for e in plan(cfg, 1, gpu, batch) if e.feasible), None)
        if est is None:
            return {"case": name, "error": f"the planner finds no layout of 1 {gpu.name} that fits"}, None
        cfg = _config(path, [*overrides, *realising_config(cfg, est.layout)], out_dir)
    trainer = Trainer(cfg, log=None, tensorboard=False)
    for _ in range(warmup):
        trainer.train_step()
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    _sync(trainer.device)
    tick = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    _sync(trainer.device)
    tokens_per_s = steps * trainer.tokens_per_step / (time.perf_counter() - tick)
    mfu = trainer.flops_per_token * tokens_per_s / trainer.peak_flops
    peak_gib = (torch.cuda.max_memory_allocated(trainer.device) if trainer.device.type == "cuda"
                else 0) / 2 ** 30
    predicted_gib = est.memory_gb["total"]
    return {"case": name, "config": path, "overrides": overrides,
            "layout": realising_config(cfg, est.layout), "tokens_per_s": tokens_per_s,
            "predicted_tokens_per_s": est.tokens_per_s, "mfu": mfu, "predicted_mfu": est.mfu,
            "peak_memory_gib": peak_gib, "predicted_memory_gib": predicted_gib,
            "ratio_tokens_per_s": tokens_per_s / est.tokens_per_s, "ratio_mfu": mfu / est.mfu,
            "ratio_memory": peak_gib / predicted_gib if peak_gib else None}, trainer


def decoding(trainer: Trainer, prompt_len: int, new_tokens: int, batch: int) -> dict:
    """Greedy decoding tokens/s of the trained model under each KV policy."""
    model, device = trainer.model, trainer.device
    prompt = torch.randint(0, min(trainer.cfg.model.vocab_size, 256), (batch, prompt_len),
                           generator=torch.Generator().manual_seed(0)).to(device)
    out = {}
    for policy in KV_POLICIES:
        generate(model, prompt, 2, rule=ExitRule("all"), kv_cache=policy)  # warm-up
        _sync(device)
        tick = time.perf_counter()
        generate(model, prompt, new_tokens, rule=ExitRule("all"), kv_cache=policy)
        _sync(device)
        out[policy] = batch * new_tokens / (time.perf_counter() - tick)
    return out


def cuda_tier() -> dict:
    """The CUDA test tier's outcome (every test skips, with its reason, where no GPU is)."""
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:randomly",
                          "-rs", str(ROOT / "tests/test_cuda.py")], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    return {"returncode": res.returncode, "summary": res.stdout.strip().splitlines()[-1:]}


def _device_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
    else:
        info["device"] = "cpu"
    return info


def _table(rows: list[dict]) -> str:
    lines = [f"{'case':<20} | {'tokens/s (pred, ratio)':>30} | {'MFU (pred, ratio)':>24} | "
             f"{'peak GiB (pred, ratio)':>24} | decode tok/s full / last / average"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<20} | {r['error']}")
            continue
        mem = f"{r['ratio_memory']:.2f}" if r["ratio_memory"] else "n/a"
        d = r["decode_tokens_per_s"]
        tps = f"{r['tokens_per_s']:>10,.0f} ({r['predicted_tokens_per_s']:>9,.0f}, " \
              f"{r['ratio_tokens_per_s']:5.2f})"
        mfu = f"{100 * r['mfu']:5.1f}% ({100 * r['predicted_mfu']:5.1f}%, {r['ratio_mfu']:5.2f})"
        gib = f"{r['peak_memory_gib']:6.1f} ({r['predicted_memory_gib']:6.1f}, {mem:>5})"
        lines.append(f"{r['case']:<20} | {tps} | {mfu} | {gib} | "
                     + " / ".join(f"{d[p]:,.0f}" for p in KV_POLICIES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per case")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (see the docstring)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_acceptance: no CUDA device; use --dry-run on CPU", file=sys.stderr)
        return 2
    doctor_text, doctor_status = report(diagnose())
    print(doctor_text)
    tier = cuda_tier()
    print(f"CUDA tier: {' '.join(tier['summary'])}")
    gpu = GPUS["h100"] if args.dry_run else lookup(torch.cuda.get_device_name())
    if gpu is None:
        print(f"gpu_acceptance: {torch.cuda.get_device_name()} is not in the planner's table "
              "(pretrain/hardware.py)", file=sys.stderr)
        return 2
    steps, warmup = (2, 1) if args.dry_run else (args.steps, args.warmup)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (path, overrides) in (DRY_CASES if args.dry_run else CASES).items():
            row, trainer = throughput(name, path, overrides, gpu, steps, warmup, args.dry_run, tmp)
            if trainer is not None:
                row["decode_tokens_per_s"] = decoding(trainer, *((16, 4, 2) if args.dry_run
                                                                 else (512, 128, 8)))
                del trainer
            rows.append(row)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    print(_table(rows))
    Path(args.out).write_text(json.dumps({"device": _device_info(), "planner_gpu": gpu.name,
                                          "dry_run": args.dry_run, "doctor": doctor_text,
                                          "doctor_status": doctor_status, "cuda_tier": tier,
                                          "cases": rows}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
