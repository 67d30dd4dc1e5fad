"""Data pipeline throughput: tokenisation tokens/s (1 and 2 processes) and loader tokens/s.

The corpus is the bundled public-domain text regrouped into ~16 MB of JSON-lines documents.
The loader runs as training uses it: 1 process, 2 DataLoader workers, seq_len 2048, batches of
8, shuffled; it is measured after a warm-up. Goal: loader >= 2,000,000 tokens/s.

    python bench/data_throughput.py [--mb 4] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.loader import StreamingData  # noqa: E402
from data_pipeline.shards import tokenize_to_shards  # noqa: E402
from data_pipeline.tokenizer import train_bpe  # noqa: E402
from pretrain.config import load_config  # noqa: E402


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=16.0, help="corpus size in MB of text")
    ap.add_argument("--seconds", type=float, default=5.0, help="loader measuring time")
    args = ap.parse_args()
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
