"""Our huginn export loaded by Huginn's own public modeling code, logits compared.

The public files (seal-rg/recurrent-pretraining, recpre/raven_modeling_minimal.py and
raven_config_minimal.py; also shipped with tomg-group-umd/huginn-0125) are not ours to vendor,
so this script fetches nothing: give it the directory holding them.

    python -m bench.huginn_public_check --modeling DIR [--checkpoint CKPT]

It exports CKPT (default: a tiny huginn model built from configs/huginn-cpu.yaml's shape with
random weights), copies the two files beside the export, loads it with
`AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)` and compares, in fp32, their
logits with ours at 1, 4 and 8 recurrences from the same initial state (`input_states`).
Prints the largest absolute difference; exits 1 above 1e-4. tests/test_huginn_format.py runs it
when HUGINN_MODELING_DIR names that directory (and skips, saying so, when it does not).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

TOLERANCE = 1e-4
ROOT = Path(__file__).resolve().parents[1]


def _tiny_checkpoint(where: Path) -> Path:
    from pretrain.checkpoint.offline import save_full_model
    from pretrain.config import load_config
    from pretrain.model.looped import LoopedLM

    cfg = load_config(ROOT / "configs/huginn-cpu.yaml", [f"train.out_dir={where}"])
    torch.manual_seed(0)
    model = LoopedLM(cfg.model)
    with torch.no_grad():  # every weight random: unit norms and zero biases would hide bugs
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "qk_bias")):
                p.add_(0.3 * torch.randn_like(p))
    return save_full_model(cfg, model, where / "checkpoints")


def check(modeling: Path, checkpoint: Path | None) -> float:
    from transformers import AutoModelForCausalLM

    from pretrain.checkpoint.offline import load_model
    from pretrain.formats.hf import export

    work = Path(tempfile.mkdtemp(prefix="huginn-check-"))
    ckpt = checkpoint or _tiny_checkpoint(work / "run")
    out = export(ckpt, work / "export")
    for name in ("raven_config_minimal.py", "raven_modeling_minimal.py"):
        shutil.copy(modeling / name, out / name)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                  torch_dtype=torch.float32).eval()
    cfg, ours = load_model(ckpt)
    ours.eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    state = torch.randn(2, 24, cfg.model.hidden_size, generator=torch.Generator().manual_seed(2))
    worst = 0.0
    with torch.no_grad():
        for steps in (1, 4, 8):
            mine = ours(ids, loops=steps, state=state.transpose(0, 1)).logits[-1].transpose(0, 1)
            got = theirs(ids, input_states=state, num_steps=torch.tensor([steps, 0])).logits
            diff = (got.float() - mine.float()).abs().max().item()
            print(f"{steps} recurrences: max |logit difference| {diff:.2e}")
            worst = max(worst, diff)
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modeling", required=True, type=Path,
                    help="directory with raven_modeling_minimal.py and raven_config_minimal.py")
    ap.add_argument("--checkpoint", type=Path, default=None)
    args = ap.parse_args()
    missing = [n for n in ("raven_config_minimal.py", "raven_modeling_minimal.py")
               if not (args.modeling / n).is_file()]
    if missing:
        print(f"huginn_public_check: {args.modeling}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    worst = check(args.modeling, args.checkpoint)
    print(f"worst {worst:.2e} (tolerance {TOLERANCE:g}): {'ok' if worst <= TOLERANCE else 'FAIL'}")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
