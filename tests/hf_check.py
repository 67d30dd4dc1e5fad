"""Run in a fresh interpreter (optionally with another transformers on PYTHONPATH): load an
exported directory with `AutoModelForCausalLM.from_pretrained(trust_remote_code=True)` only,
and save what it computes for the test to compare: every loop step's logits, the exit
distribution, a greedy generation, the tokenizer's ids for "The Fox" (when the export has a
tokenizer), and the transformers version."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def main(hf_dir: str, out: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()
    ids = torch.load(out + ".ids", weights_only=True)
    with torch.no_grad():
        res = model(ids, output_loop_logits=True)
        gen = model.generate(ids[:1, :5], max_new_tokens=6, do_sample=False)
        q = model(ids, exit_threshold=0.5).logits
    tokens = None
    if (Path(hf_dir) / "tokenizer.json").is_file():
        tokens = AutoTokenizer.from_pretrained(hf_dir)("The Fox", add_special_tokens=False).input_ids
    torch.save({"loop_logits": torch.stack(res["loop_logits"]), "exit_pdf": res["exit_pdf"],
                "tokens": tokens,
                "generated": gen, "threshold_logits": q, "version": transformers.__version__,
                "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()},
               out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
