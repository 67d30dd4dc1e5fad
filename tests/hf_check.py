"""Run in a fresh interpreter (optionally with another transformers on PYTHONPATH): load an
exported directory with `AutoModelForCausalLM.from_pretrained(trust_remote_code=True)` only,
and save what it computes for the test to compare: every loop step's logits, the exit
distribution, a greedy generation, and the stock way in: `AutoTokenizer.from_pretrained(dir)`
(transformers 5 reads the model's config first, custom code, so it needs trust_remote_code
there too) and `model.generate(**tok("The Fox", return_tensors="pt"))`; the transformers
version."""

from __future__ import annotations

import sys

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
    remote = {"trust_remote_code": True} if transformers.__version__.startswith("5.") else {}
    tok = AutoTokenizer.from_pretrained(hf_dir, **remote)
    enc = tok("The Fox", return_tensors="pt")
    with torch.no_grad():
        stock = model.generate(**enc, max_new_tokens=4, do_sample=False)
    torch.save({"loop_logits": torch.stack(res["loop_logits"]), "exit_pdf": res["exit_pdf"],
                "tokens": enc["input_ids"][0].tolist(), "input_names": sorted(enc),
                "stock_generated": stock,
                "generated": gen, "threshold_logits": q, "version": transformers.__version__,
                "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()},
               out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
