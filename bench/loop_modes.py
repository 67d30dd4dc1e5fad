"""Loop modes in miniature: do later loop steps improve held-out CE, and does looping pay?

Real text that a package ships: the CPython standard library's sources (the interpreter's own
`Lib/`, tests excluded), split by file into training and held-out documents (sha1 of the path:
1 in 20 held out), byte-level BPE 4096 trained on the training files. Every configuration
trains the same number of tokens from the seed (windows drawn from (seed, step)) and is scored
on the same held-out windows: CE at every loop step (all loops run, `--eval-loops` of them
where more) and the mean L2 norm of the block output x_t per loop (the FLT paper's
residual-explosion diagnostic). A step's R, backprop window, initial states and lr follow the
run's `recurrence` section (a drawn R, loop growth and its lr re-warm), as the trainer's do.

    python -m bench.loop_modes prepare                       # corpus + tokenizer (CPU, ~1 min)
    python -m bench.loop_modes run [--only NAME ...] [--tokens N] [--device cuda]

`run` needs only torch and this repository's model code (no megatron, DeepSpeed, webdataset),
so it also runs on a GPU machine with the prepared arrays carried over. Results: JSON (--out)
and a table; bench/RESULTS.md records them with the device that produced them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pretrain.config import load_config
from pretrain.model.looped import LoopedLM
from pretrain.model.objective import compute_objective, per_step_ce, readout_steps
from pretrain.model.recurrence import Recurrence
from pretrain.optim import build_optimizer, set_lr
from pretrain.train import step_lr

ROOT = Path(__file__).resolve().parents[1]

DATA = ROOT / "runs/bench-loop-modes"
# the scale: hidden 192 x 3 shared layers, BPE 4096, ~2.9M parameters
SHAPE = ["model.vocab_size=4096", "model.hidden_size=192", "model.num_layers=3",
         "model.num_heads=6", "model.num_kv_heads=6", "model.ffn_hidden_size=512",
         "model.max_seq_len=256", "train.seq_len=256", "train.micro_batch_size=32",
         "optim.lr=2e-3", "optim.min_lr=2e-4", "optim.warmup_steps=30", "optim.weight_decay=0.1",
         "optim.schedule=cosine"]
# the FLT authors' layer recipe at this size (configs/flt-cpu-*.yaml for the rest)
FLT = ["model.sandwich_norm=false", "model.norm_weights=false", "model.qk_norm=true",
       "model.mlp=relu2", "model.ffn_hidden_size=768", "model.logit_softcap=15",
       "model.rope_reverse=true", "model.init=flt", "model.norm_eps=1.1920929e-07",
       "optim.name=muon", "optim.muon_lr=0.02", "optim.embedding_lr=0.2", "optim.head_lr=0.004",
       "optim.lr=0.004", "optim.min_lr=0.0", "optim.weight_decay=0.0", "optim.beta1=0.8",
       "optim.eps=1e-10", "optim.schedule=wsd", "optim.warmup_steps=0",
       "optim.decay_fraction=0.2", "objective.kind=last"]
# the two sandwich families with one prelude, two shared and one coda layer
HUGINN = ["model.loop_mode=huginn", "model.prelude_layers=1", "model.coda_layers=1",
          "model.num_layers=2", "model.ffn_hidden_size=1024", "model.tie_embeddings=true",
          "model.sandwich_style=huginn", "model.qk_bias=true", "model.embed_scale=13.856",
          "model.state_std=0.0456", "model.init=huginn", "model.init_std=0.0456",
          "objective.kind=last", "model.loops=3", "recurrence.sampler=poisson_lognormal",
          "recurrence.backprop=4"]
PARCAE = ["model.loop_mode=parcae", "model.prelude_layers=1", "model.coda_layers=1",
          "model.num_layers=2", "model.tie_embeddings=true", "model.sandwich_norm=false",
          "model.qk_norm=true", "model.mlp=relu2_half", "model.init=parcae",
          "model.state_std=0.0456", "model.init_std=0.0456", "objective.kind=last",
          "model.loops=4", "recurrence.sampler=poisson", "recurrence.per_sequence=true",
          "recurrence.backprop=4"]
# the FLT authors' optimizer alone (Muon for the layers' matrices), Ouro's layers kept
MUON = ["optim.name=muon", "optim.muon_lr=0.02", "optim.weight_decay=0.0"]
EXPERIMENTS = {
    # Ouro mode at equal parameters: one pass vs four loops, with and without the norm
    "ouro-R1": ["model.loops=1"],
    "ouro-R4": ["model.loops=4"],
    "ouro-R4-no-norm": ["model.loops=4", "model.norm_between_loops=false"],
    # recipes within the papers' family of choices
    "ouro-R4-beta0.01": ["model.loops=4", "objective.beta=0.01"],
    "ouro-R4-all": ["model.loops=4", "objective.kind=all"],
    "ouro-R4-few": ["model.loops=4", "objective.kind=few"],
    "ouro-R4-last": ["model.loops=4", "objective.kind=last"],
    "ouro-R4-lr5e-4": ["model.loops=4", "optim.lr=5e-4", "optim.min_lr=5e-5"],
    "ouro-R4-lr8e-3": ["model.loops=4", "optim.lr=8e-3", "optim.min_lr=8e-4"],
    # the FLT paper's comparison at K = 12 with its recipe
    "lt-K12": ["model.loops=12", "model.loop_mode=lt", *FLT],
    "flt-K12": ["model.loops=12", "model.loop_mode=flt", *FLT],
    "lt_i-K12": ["model.loops=12", "model.loop_mode=lt_i", *FLT],
    "lt_ia-K12": ["model.loops=12", "model.loop_mode=lt_ia", *FLT],
    "flt-K1": ["model.loops=1", "model.loop_mode=flt", *FLT],
    # separating the FLT recipe's parts at R = 4 vs R = 1: the optimizer alone, the whole layer
    # recipe under Ouro's loop, and the objectives that weigh every step
    "ouro-R1-muon": ["model.loops=1", *MUON],
    "ouro-R4-muon": ["model.loops=4", *MUON],
    "ouro-R4-muon-all": ["model.loops=4", "objective.kind=all", *MUON],
    "ouro-flt-recipe-R1": ["model.loops=1", *FLT, "objective.kind=elbo"],
    "ouro-flt-recipe-R4": ["model.loops=4", *FLT, "objective.kind=elbo"],
    "ouro-flt-recipe-R4-all": ["model.loops=4", *FLT, "objective.kind=all"],
    "flt-K4-last": ["model.loops=4", "model.loop_mode=flt", *FLT],
    "flt-K4-all": ["model.loops=4", "model.loop_mode=flt", *FLT, "objective.kind=all"],
    "lt_i-K4-all": ["model.loops=4", "model.loop_mode=lt_i", *FLT, "objective.kind=all"],
    "lt_ia-K4-all": ["model.loops=4", "model.loop_mode=lt_ia", *FLT, "objective.kind=all"],
    # loop growth (arXiv 2609.19107's Loop-Grow) against fixed R = 4 (ouro-R4-last), sized for
    # `--tokens 500000` (61 steps): R = 2 for the first 30 steps, then 4, the lr re-warmed over 5
    "ouro-grow2to4-last": ["model.loops=4", "objective.kind=last",
                           "recurrence.grow=[{until: 30, loops: 2}]", "recurrence.rewarm_steps=5"],
    # Huginn vs Parcae at equal parameters (3.81M: Parcae's value embeddings against a wider
    # Huginn MLP) and equal expected depth E[R] = 4 (Huginn's draw has E[R] = loops + 1), each
    # with its own released recipe (sampler, the last 4 steps backpropagated, their init)
    "huginn-ER4": HUGINN,
    "parcae-ER4": PARCAE,
}
HELD_OUT_WINDOWS = 256


def _documents() -> list[tuple[str, str]]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in lib.rglob("*.py") if not {"test", "tests", "idlelib",
                                                         "site-packages"} & set(f.parts))
    return [(str(f.relative_to(lib)), f.read_text(errors="replace")) for f in files]


def prepare(out: Path) -> None:
    from data_pipeline.tokenizer import EOS_TOKEN, eos_id, train_bpe

    docs = [(p, t) for p, t in _documents() if t.strip()]
    held = [t for p, t in docs if hashlib.sha1(p.encode()).digest()[0] % 20 == 0]
    train = [t for p, t in docs if hashlib.sha1(p.encode()).digest()[0] % 20 != 0]
    tok = train_bpe(train, 4096, out / "tokenizer.json", EOS_TOKEN)
    eos = eos_id(tok)
    for name, texts in (("train", train), ("heldout", held)):
        ids = []
        for enc in tok.encode_batch(texts, add_special_tokens=False):
            ids.extend(enc.ids + [eos])
        np.save(out / f"{name}.npy", np.asarray(ids, dtype=np.uint16))
    meta = {"documents": {"train": len(train), "heldout": len(held)},
            "bytes": {"train": sum(map(len, train)), "heldout": sum(map(len, held))},
            "tokens": {n: int(np.load(out / f"{n}.npy").shape[0]) for n in ("train", "heldout")},
            "python": sys.version.split()[0]}
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    print(json.dumps(meta))


def _windows(tokens: Tensor, starts: Tensor, seq: int) -> tuple[Tensor, Tensor]:
    idx = starts[:, None] + torch.arange(seq + 1)
    w = tokens[idx]
    return w[:, :-1], w[:, 1:]


def train_and_score(overrides: list[str], data: Path, tokens: int, device: str,
                    seed: int = 1234, eval_loops: int = 0) -> dict:
    cfg = load_config(None, [*SHAPE, *overrides, f"train.seed={seed}"])
    t, r = cfg.train, max(cfg.model.loops, eval_loops)
    steps = max(tokens // (t.micro_batch_size * t.seq_len), 1)
    cfg.train.max_steps = steps
    rec = Recurrence.of(cfg)
    train = torch.from_numpy(np.load(data / "train.npy").astype(np.int64))
    held = torch.from_numpy(np.load(data / "heldout.npy").astype(np.int64))
    torch.manual_seed(cfg.train.seed)
    model = LoopedLM(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")
    start = time.perf_counter()
    for step in range(steps):
        set_lr(opt, step_lr(cfg, step))
        starts = torch.randint(0, len(train) - t.seq_len - 1, (t.micro_batch_size,), generator=gen)
        x, y = (v.to(device) for v in _windows(train, starts, t.seq_len))
        plan = rec.plan(t.seed, step, 0, 1, t.micro_batch_size)
        with amp:
            out = model(x, loops=plan.loops, backprop=plan.backprop,
                        read_steps=readout_steps(cfg.objective.kind, plan.loops),
                        state_seed=plan.state_seeds[0],
                        depths=plan.depths[0] if plan.depths else None)
            loss = compute_objective(cfg.objective, out, y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    model.eval()
    ce, norms, n = torch.zeros(r, dtype=torch.float64), torch.zeros(r, dtype=torch.float64), 0
    starts = torch.arange(HELD_OUT_WINDOWS) * t.seq_len
    with torch.no_grad(), amp:
        for chunk in starts.split(32):
            x, y = (v.to(device) for v in _windows(held, chunk, t.seq_len))
            out = model(x, loops=r, state_seed=tuple(range(len(chunk))))
            ce += per_step_ce(out.logits, y.t()).double().mean((1, 2)).cpu() * len(chunk)
            norms += out.hidden_norm.double().cpu() * len(chunk)
            n += len(chunk)
    ce, norms = (ce / n).tolist(), (norms / n).tolist()
    params = sum(p.numel() for p in model.parameters())
    return {"ce_per_step": ce, "hidden_norm": norms, "final_ce": ce[-1], "best_ce": min(ce),
            "falls_every_step": all(b < a for a, b in zip(ce, ce[1:], strict=False)),
            "params": params, "tokens": steps * t.micro_batch_size * t.seq_len, "steps": steps,
            "train_seconds": seconds, "device": torch.cuda.get_device_name() if device == "cuda"
            else "cpu", "overrides": overrides}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=("prepare", "run"))
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--only", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    ap.add_argument("--tokens", type=int, default=3_000_000, help="training tokens per run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    ap.add_argument("--eval-loops", type=int, default=0,
                    help="score this many loop steps where the model's own R is fewer")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1234],
                    help="train.seed of each repetition (initialisation and data order)")
    args = ap.parse_args()
    if args.action == "prepare":
        args.data.mkdir(parents=True, exist_ok=True)
        prepare(args.data)
        return
    results = {}
    for name in (f"{n}@{s}" if len(args.seeds) > 1 else n for s in args.seeds for n in args.only):
        base, _, seed = name.partition("@")
        res = results[name] = train_and_score(EXPERIMENTS[base], args.data, args.tokens,
                                              args.device, int(seed or args.seeds[0]),
                                              args.eval_loops)
        ce = " ".join(f"{c:.3f}" for c in res["ce_per_step"])
        hn = " ".join(f"{h:.1f}" for h in res["hidden_norm"])
        print(f"{name:22} params {res['params']:,} tokens {res['tokens']:,} "
              f"({res['train_seconds']:.0f} s) | held-out CE per loop: {ce} | "
              f"|x_t|: {hn} | falls every step: {res['falls_every_step']}", flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
