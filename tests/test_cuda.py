"""The CUDA tier's own tests (`pytest -m cuda`; skipped, with the reason, where no GPU is).
Tests that hold on both devices are parametrised over tests/conftest.py DEVICES instead
(recompute bit-equality, bf16 autocast against fp32, compiled against eager)."""

from __future__ import annotations

import pytest
import torch

from pretrain.kernels import adamw, apex_fused_adam
from pretrain.model.looped import LoopedLM
from pretrain.train import Trainer
from tests.conftest import VARIANTS, needs_cuda, tiny_config

pytestmark = [pytest.mark.cuda, needs_cuda]

CUDA = torch.device("cuda")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_loop_mode_on_cuda_equals_cpu_fp32(variant):
    cfg = tiny_config(*VARIANTS[variant], "model.loops=4")
    torch.manual_seed(cfg.train.seed)
    model = LoopedLM(cfg.model).eval()
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    cpu = model(ids)
    gpu = model.to(CUDA)(ids.to(CUDA))
    # the same fp32 operations reduced in another order (cuBLAS, the CUDA SDPA kernels):
    # ~1e-6 relative per op, compounded over 2 layers x 4 loops
    for got, want in zip(gpu.logits, cpu.logits, strict=True):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gpu.gate_logits.cpu(), cpu.gate_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["torch fused", "apex"])
def test_fused_adamw_steps_equal_the_reference(kernel):
    """The fused update (torch's CUDA kernel, or apex FusedAdam where it imports) against
    torch's per-tensor AdamW, five steps on the same gradients."""
    if kernel == "apex" and apex_fused_adam(CUDA) is None:
        pytest.skip("apex FusedAdam does not import here")
    g = torch.Generator(device=CUDA).manual_seed(0)
    shapes = [(64, 32), (32,), (7, 5, 3)]
    start = [torch.randn(s, device=CUDA, generator=g) for s in shapes]
    grads = [[torch.randn(s, device=CUDA, generator=g) for s in shapes] for _ in range(5)]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)

    def run(make):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = make(params)
        for step in grads:
            for p, gr in zip(params, step, strict=True):
                p.grad = gr.clone()
            opt.step()
        return params

    ref = run(lambda ps: torch.optim.AdamW(ps, foreach=False, **kw))
    fused = run(lambda ps: adamw(ps, CUDA, **kw) if kernel == "apex"
                else torch.optim.AdamW(ps, fused=True, **kw))
    # one multi-tensor kernel computes the same update with fused multiply-adds: a few ulps
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_moves_between_gpu_and_cpu(tmp_path):
    """Written on the GPU, resumed on the CPU with the very same weights, and back."""
    before = None
    for steps, device in ((2, "cuda"), (3, "cpu"), (4, "cuda")):
        trainer = Trainer(tiny_config(f"train.max_steps={steps}", "optim.warmup_steps=0",
                                      f"train.device={device}", out_dir=tmp_path),
                          log=None, tensorboard=False)
        trainer.resume("auto")
        if before is not None:
            assert trainer.step == steps - 1
            for (name, x), y in zip(before.items(), trainer.model.state_dict().values(), strict=True):
                assert torch.equal(x, y.cpu()), name
        trainer.fit()
        before = {k: v.cpu() for k, v in trainer.model.state_dict().items()}

