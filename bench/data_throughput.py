"""Data pipeline throughput: tokenisation tokens/s (1 and 2 processes) and loader tokens/s;
with --array, tokenisation as a SLURM job array on the local cluster.

The corpus is the bundled public-domain text regrouped into ~16 MB of JSON-lines documents.
The loader runs as training uses it: 1 process, 2 DataLoader workers, seq_len 2048, batches of
8, shuffled; it is measured after a warm-up. Goal: loader >= 2,000,000 tokens/s.

--array: ~50 MB of real text (CPython's standard library sources of this interpreter, plus the
bundled sample repeated up to the size), one process against job arrays of 1 and 2 tasks
(submit to merged manifest, wall clock; the ratio is what counts), then a 4-task array with one
task killed and the same command submitted again. Every merged manifest must equal the
single-process one, token for token.

    python -m bench.data_throughput [--mb 4] [--seconds 5] [--array]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipeline.loader import StreamingData
from data_pipeline.shards import tokenize_to_shards
from data_pipeline.tokenizer import train_bpe
from pretrain.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(path: Path, megabytes: float) -> list[str]:
    words = (ROOT / "data/sample.txt").read_text().split()
    rng = np.random.default_rng(0)
    docs, size = [], 0
    while size < megabytes * 1e6:
        start = int(rng.integers(0, len(words) - 400))
        doc = " ".join(words[start:start + int(rng.integers(50, 400))])
        docs.append(doc)
        size += len(doc)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return docs


def _cli(*args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "pretrain.cli", *args], capture_output=True,
                         text=True, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"pretrain {' '.join(args)}: {res.stderr}")
    return res.stdout


def _wait_merge(stdout: str, kill: int | None = None) -> tuple[str, str]:
    """The array and merge job ids of a submission; with `kill`, that task is cancelled and
    the merge (which then never runs) too. Waits until the merge ended (or both were cut)."""
    from slurm.submit import job_state

    array, merge = re.search(r"job array (\d+) .* merge job (\d+)", stdout).groups()
    if kill is not None:
        subprocess.run(["scancel", f"{array}_{kill}"], check=True)
        while subprocess.run(["squeue", "-h", "-j", array], capture_output=True,
                             text=True).stdout.strip():
            time.sleep(0.5)
        subprocess.run(["scancel", merge], check=True)
        return array, merge
    while job_state(merge) not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
        time.sleep(0.5)
    if job_state(merge) != "COMPLETED":
        raise SystemExit(f"merge job {merge}: {job_state(merge)}")
    return array, merge


def array_bench(root: Path, megabytes: float) -> None:
    """Job arrays on the local SLURM cluster against one process, on ~`megabytes` of text."""
    import glob
    import os
    import sysconfig

    from data_pipeline.shards import Manifest
    from data_pipeline.stream import ShardSource

    std = Path(sysconfig.get_paths()["stdlib"])
    inputs = [str(std / "*.py")] + [str(d / "**/*.py") for d in sorted(std.iterdir())
                                    if d.is_dir() and d.name != "site-packages"
                                    and glob.glob(str(d / "**/*.py"), recursive=True)]
    have = sum(os.path.getsize(f) for pat in inputs for f in glob.glob(pat, recursive=True))
    sample = (ROOT / "data/sample.txt").read_text()
    copies = max(0, int((megabytes * 1e6 - have) // len(sample)))
    (root / "sample.jsonl").write_text("".join(json.dumps({"text": f"copy {i}\n{sample}"}) + "\n"
                                               for i in range(copies)))
    inputs.append(str(root / "sample.jsonl"))
    total = have + copies * len(sample)
    print(f"array corpus: {have / 1e6:.1f} MB of standard library sources + {copies} copies of "
          f"the sample = {total / 1e6:.1f} MB")
    state = root / "slurm"  # private to this run
    env = {**os.environ, "LOCAL_SLURM_PORT": "16901"}
    subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "start", str(state)], env=env,
                   check=True, capture_output=True)
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        tok = str(root / "tok.json")
        _cli("data", "train-tokenizer", "--input", *inputs, "--sample-bytes", "4000000",
             "--vocab-size", "4096", "--output", tok, "--on-error", "skip")
        common = ["--input", *inputs, "--tokenizer", tok, "--on-error", "skip",
                  "--shard-tokens", str(1 << 22)]
        start = time.perf_counter()
        _cli("data", "tokenize", *common, "--output", str(root / "one"))
        one_s = time.perf_counter() - start
        ref = Manifest.load(root / "one")
        print(f"one process: {ref.total_tokens:,} tokens, {ref.documents:,} documents, skipped "
              f"{ref.skipped}: {ref.total_tokens / one_s:,.0f} tokens/s")
        ref_tokens = ShardSource(str(root / "one"), 0, 0, 0, False, 1 << 20, None)._read(
            0, 0, ref.total_tokens)

        def same(out: Path) -> bool:
            got = ShardSource(str(out), 0, 0, 0, False, 1 << 20, None)._read(0, 0, ref.total_tokens)
            return Manifest.load(out) == ref and bool((got == ref_tokens).all())

        rates = {}
        for tasks in (1, 2):
            out = root / f"array{tasks}"
            start = time.perf_counter()
            _wait_merge(_cli("data", "tokenize", *common, "--output", str(out), "--tasks",
                             str(tasks), "--submit", "--time", "01:00:00"))
            rates[tasks] = ref.total_tokens / (time.perf_counter() - start)
            print(f"array of {tasks} task(s), submit to merged: {rates[tasks]:,.0f} tokens/s "
                  f"({rates[tasks] * one_s / ref.total_tokens:.2f}x one process); manifest and "
                  f"tokens equal to one process: {same(out)}")
        print(f"2 tasks / 1 task: {rates[2] / rates[1]:.2f}x")
        out = root / "array4"
        submit = ["data", "tokenize", *common, "--output", str(out), "--tasks", "4", "--submit",
                  "--time", "01:00:00"]
        _wait_merge(_cli(*submit), kill=2)
        print(f"4 tasks, task 2 killed: {_cli('status', str(out)).splitlines()[0]}")
        array, _ = _wait_merge(_cli(*submit))
        redone = [k for k in range(4) if "done already" not in
                  (out / f"parts/slurm-{array}_{k}.out").read_text()]
        print(f"resubmitted: parts redone {redone}; merged manifest and tokens equal to one "
              f"process: {same(out)}")
    finally:
        subprocess.run(["bash", str(ROOT / "slurm/local_cluster.sh"), "stop", str(state)],
                       env=env, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size in MB of text")
    ap.add_argument("--seconds", type=float, default=5.0, help="loader measuring time")
    ap.add_argument("--array", action="store_true", help="job arrays on the local SLURM cluster")
    ap.add_argument("--array-mb", type=float, default=50.0, help="text for the array runs")
    args = ap.parse_args()
    if args.array:
        with tempfile.TemporaryDirectory() as tmp:
            array_bench(Path(tmp), args.array_mb)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        docs = make_corpus(root / "docs.jsonl", args.mb)
        train_bpe(docs[:2000], 4096, root / "tok.json")
        for workers in (1, 2):
            start = time.perf_counter()
            m = tokenize_to_shards([str(root / "docs.jsonl")], root / f"shards{workers}",
                                   root / "tok.json", shard_tokens=1 << 18, workers=workers,
                                   progress=False)
            rate = m.total_tokens / (time.perf_counter() - start)
            print(f"tokenize: {workers} process(es): {m.total_tokens:,} tokens in "
                  f"{len(m.shards)} shards, {rate:,.0f} tokens/s")
        cfg = load_config(ROOT / "configs/tiny.yaml", [
            "data.source=shards", f"data.sources=[{{path: {root / 'shards2'}}}]",
            "model.vocab_size=4096", "model.max_seq_len=2048", "train.seq_len=2048",
            "train.micro_batch_size=8", "data.num_workers=2", "data.shuffle_buffer=256"])
        batches = StreamingData(cfg).batches()
        for _ in range(20):  # warm-up: workers started, first blocks read
            next(batches)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            inputs, _ = next(batches)
            n += inputs.numel()
        rate = n / (time.perf_counter() - start)
        print(f"loader: 1 process, 2 workers, seq_len 2048, batch 8: {rate:,.0f} tokens/s "
              f"(goal 2,000,000: {rate / 2e6:.2f}x)")


if __name__ == "__main__":
    main()
