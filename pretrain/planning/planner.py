"""Throughput model: per-GPU memory, step time and MFU of a TP x PP x DP layout, and a ranking.

Everything is computed from the config's shapes and the accelerator table (hardware.py); the
efficiency constants below are stated once, from public figures, and are not fitted to any
run. Per token (per GPU: divided by TP; per step: times the GPU's tokens):

  GEMMs       2 x 3 x (matmul FLOPs) at GEMM_EFFICIENCY x peak, lower for narrow GEMMs
              (width w per TP rank: x w / (w + NARROW_GEMM))
  attention   causal FlashAttention: half the counted score/value FLOPs, at ATTENTION_EFFICIENCY
  elementwise norms, rotary, residual adds, SwiGLU: bytes at ELEMENTWISE_BANDWIDTH x HBM
  loss        the fp32 cross-entropy over the vocabulary, per loop step: LOSS_BYTES_PER_LOGIT
              through HBM per logit (bf16->fp32 cast 6, log-softmax reading twice and writing
              once 12, the dense gradient NLL writes 4, log-softmax backward 12, cast back 6).
              At a 131k vocabulary this is as much traffic as all the layers' elementwise work
  TP          4 all-reduces (or all-gather + reduce-scatter pairs, with sequence parallelism)
              of s x b x h bf16 per layer per loop (2 forward, 2 backward, 2 more for a
              recomputed forward), ring cost 2 (t-1)/t over NVLink, not overlapped
  DP          without ZeRO an all-reduce of the fp32 gradients; with ZeRO a reduce-scatter of
              the gradients + an all-gather of the parameters; ring cost over InfiniBand once
              DP leaves the node. With `parallel.overlap_grad_reduce` the gradient reduction
              hides behind the backward of the last microbatch (parallelism/grad_overlap.py,
              DeepSpeed's overlap_comm), the all-gather behind the next forward; the rest is
              exposed. Without it (or with R sampled per step), all of it is exposed.
  PP          the circular pipeline's bubble: (p-1)/(R m + p-1) of the step; p2p overlapped
  optimizer   Adam over this rank's shard: ~32 bytes per parameter through HBM
  launches    eager PyTorch pays LAUNCH_S of host time per ATen op (dispatch + kernel launch);
              the host runs ahead of the GPU, so a stage's step takes the longer of its GPU work
              and its ops x LAUNCH_S (pretrain/planning/fake_step.py `eager_ops` counts the step's ops:
              per micro-batch, and per step). Many small micro-batches lose to launch overhead
Truncated backprop and a sampled R (pretrain/model/recurrence.py): the loop steps count at E[R]
with E[k] of them running a backward (a step without a graph costs its forward only); memory
keeps the backprop window's laps alone (k, or R's 99th percentile when R is sampled without
truncation); the bubble counts E[R] laps.
Recompute (`train.recompute`) adds the recomputed forward: `full` every layer's, `loops` that
of the first R-k loops' layers, `selective` the attention core's; the chunked readout
(`train.loss_chunk_tokens`) the head's and the loss's. `train.precision: fp32` runs GEMMs at
the TF32 rate (half the bf16 peak) and moves twice the elementwise bytes.
Memory, as the trainer holds it: fp32 weights 4 B (bf16 is autocast, the weights are the
master copy) + fp32 grads 4 B + Adam moments 8 B per parameter (the 8 B divided over DP with
ZeRO), and, each measured against the real step under fake tensors (`pretrain plan --fake`):
  autocast cache   bf16 weight copies, 2 B per matmul parameter, kept for the whole step (one
                   autocast region: every micro-batch reuses the casts)
  loop grad sum    from the second micro-batch on, autograd's sum of the R loops' gradient
                   contributions to each shared-block weight, held beside the accumulated
                   gradient through the backward: 2 B per parameter under bf16 (summed on the
                   autocast copy), 4 B in fp32 or in megatron's TP layers (they cast inside
                   their autograd Function); the pipeline's backward per lap sums nothing
  grad buckets     with DP and no ZeRO, the reducer's flat fp32 copies, 4 B per parameter,
                   until the optimizer step (parallelism/grad_overlap.py): overlapped, they
                   fill during the last backward in the loop sums' place; otherwise after
                   backward, counted only beyond what backward held besides the gradients
  zero buffers     DeepSpeed's fp32 master and averaged-gradient partitions (8 B per
                   parameter / DP) and its reduce bucket (two while overlapping)
  grad transient   the widest weight's gradient as backward makes it, bf16 and fp32 at once,
                   beside the gradient it is added to (so from the second backward of a step
                   on; where the loop sums are held, it is their first contribution: not
                   extra); the head's shares a stage with the layers only without the pipeline
  readout chunk    with a chunked readout, one chunk's logits in its backward
                   (READOUT_BYTES_PER_LOGIT), which runs before the block's: where it exceeds
                   the loop sums and the gradient transient
  activations      pretrain/model/activations.py (what this code saves for backward, checked
                   exactly by bench/activation_memory.py) for the worst pipeline stage, times
                   the pieces the schedule keeps alive at once.
MFU counts model FLOPs (flops_per_token: full attention scores, as Megatron counts them);
`Estimate.flops` is what a GPU executes in a step (recompute included, full attention scores:
torch's FLOP counter's convention), which `pretrain plan --fake` measures.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from core.config_schema import set_dotted
from parallelism.pipeline_schedule import peak_live, schedule
from pretrain.config import Config, ConfigError, config_from_tree, validate
from pretrain.model.activations import Shard, layer_elements, saved_bytes
from pretrain.model.flops import (
    count_parameters,
    layer_matmul_flops,
    loop_flops,
    read_count,
    run_flops_per_token,
)
from pretrain.model.memory import MemoryPolicy
from pretrain.model.recurrence import Recurrence, step_samples
from pretrain.planning.fake_step import eager_ops
from pretrain.planning.hardware import Accelerator

GEMM_EFFICIENCY = 0.80  # large bf16 GEMMs reach ~80% of the dense peak (cuBLAS, Hopper)
NARROW_GEMM = 512  # efficiency halves at a GEMM width this small (tile quantisation, waves)
ATTENTION_EFFICIENCY = 0.50  # FlashAttention-2 forward + backward, fraction of peak
ELEMENTWISE_BANDWIDTH = 0.80  # memory-bound kernels, fraction of HBM bandwidth
LOSS_BYTES_PER_LOGIT = 40  # fp32 cross-entropy forward + backward, counted in the docstring
COLLECTIVE_EFFICIENCY = 0.80  # NCCL ring bus bandwidth, fraction of the link
MEMORY_HEADROOM = 0.90  # usable fraction of device memory (allocator, CUDA context)
TF32_RATE = 0.5  # fp32 GEMMs run as TF32 at half the dense bf16 peak (H100, A100)
# host time per eager ATen op: ~3-5 us of dispatch and ~2-4 us of cudaLaunchKernel on a server
# CPU (the FLT figure: 3.9M ops, 20-30 s a step, is 5-8 us)
LAUNCH_S = 6e-6
# what one chunk of the deferred readout holds at once in its backward, per logit: the fp32
# log-softmax output, its gradient and the logits' gradient (4 B each); with a soft cap also
# the tanh output (+4). Counted under fake tensors (bench/fake_step.py: 11.6 and 15.6 B)
READOUT_BYTES_PER_LOGIT = 12


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    micro_batch: int
    microbatches: int  # per step and DP rank (gradient accumulation / pipeline microbatches)
    zero: bool = True  # optimizer states sharded over DP


@dataclass
class Estimate:
    layout: Layout
    memory_gb: dict[str, float]
    time_s: dict[str, float]
    step_s: float
    mfu: float
    tokens_per_s: float
    feasible: bool
    why: str = ""
    flops: float = 0.0  # executed per GPU per step (module docstring)
    # per GPU per step, full-tensor bytes of the collectives (an all-gather's output, a
    # reduce-scatter's input): TP's in the layers, DP's of the gradients (and ZeRO's weights)
    comm_bytes: dict[str, float] = dataclasses.field(default_factory=dict)


def _gemm_time(flops: float, width: float, gpu: Accelerator) -> float:
    eff = GEMM_EFFICIENCY * width / (width + NARROW_GEMM)
    return flops / (gpu.peak_flops * eff)


def _ring(bytes_: float, n: int, bw: float) -> float:
    return 0.0 if n == 1 else 2 * (n - 1) / n * bytes_ / (bw * COLLECTIVE_EFFICIENCY)


def check(cfg: Config, lay: Layout, gpu: Accelerator, global_batch: int) -> str:
    """Why a layout cannot run ('' if it can)."""
    m = cfg.model
    if lay.tp > gpu.per_node:
        return f"TP {lay.tp} spans nodes (> {gpu.per_node} GPUs per node)"
    for name in ("num_heads", "num_kv_heads", "ffn_hidden_size", "vocab_size"):
        if getattr(m, name) % lay.tp:
            return f"model.{name} {getattr(m, name)} not divisible by TP {lay.tp}"
    if lay.pp > m.num_layers:
        return f"PP {lay.pp} > {m.num_layers} shared layers"
    if lay.dp * lay.micro_batch * lay.microbatches != global_batch:
        return f"global batch {global_batch} != DP x micro-batch x microbatches"
    if lay.pp > 1 and m.loops > 1 and lay.microbatches % lay.pp:
        return f"{lay.microbatches} microbatches not a multiple of PP {lay.pp} (interleaved 1F1B)"
    try:  # what the run itself would refuse (Muon under TP or ZeRO, ...)
        validate(realised(cfg, lay))
    except ConfigError as e:
        return str(e)
    return ""


def realised(cfg: Config, lay: Layout) -> Config:
    """The config that runs `lay`: `cfg` with the overrides `realising_config` prints."""
    tree = cfg.to_dict()
    for override in realising_config(cfg, lay):
        set_dotted(tree, override)
    return config_from_tree(tree)


def _recomputed_share(cfg: Config) -> float:
    """Fraction of the backpropagated layers' forward that backward runs again."""
    loops = Recurrence.of(cfg).window(step_samples(cfg))
    policy = MemoryPolicy.of(cfg.train)
    return sum(policy.recomputes_layer(i, loops) for i in range(loops)) / loops


def activation_bytes(cfg: Config, lay: Layout) -> float:
    """Bytes kept for backward on the fullest pipeline stage: one microbatch's (the backprop
    window's laps; steps without a graph keep nothing) per lap, times the pieces the circular
    schedule keeps alive at once."""
    window = Recurrence.of(cfg).window(step_samples(cfg))
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loops=window),
                              recurrence=dataclasses.replace(cfg.recurrence, sampler="fixed",
                                                             grow=[]))
    m, tp, pp = cfg.model, lay.tp, lay.pp
    shards = tp if tp > 1 else 1
    policy = MemoryPolicy.of(cfg.train, shards)
    bf16 = cfg.train.precision == "bf16"
    stages = [Shard(tp, tp > 1, layers=-(-m.num_layers // pp), first=k == 0, last=k == pp - 1)
              for k in {0, pp - 1}]
    per_mb = max(saved_bytes(cfg, lay.micro_batch, policy, st, bf16, read_count(cfg)) for st in stages)
    if pp == 1:
        return per_mb
    kind = cfg.parallel.pipeline_schedule
    live = max(peak_live(schedule(kind, pp, m.loops, lay.microbatches, r)) for r in range(pp))
    return per_mb / m.loops * live


def gpu_params(m, params: dict[str, int], tp: int, pp: int) -> float:
    """Parameters one GPU holds (a stage's mean): the model over TP x PP, plus, under the
    pipeline, the last stage's copy of a tied embedding (parallelism/pipeline.py)."""
    copy = params["embedding"] if m.tie_embeddings and pp > 1 else 0
    return (params["total"] + copy) / (tp * pp)


def memory_bytes(cfg: Config, lay: Layout, overlapped: bool,
                 params: dict[str, int]) -> dict[str, float]:
    """Per-GPU bytes at the step's peak, term by term (module docstring); `params`: the
    model's `count_parameters`."""
    m, tr, t, p, d = cfg.model, cfg.train, lay.tp, lay.pp, lay.dp
    per_gpu_params = gpu_params(m, params, t, p)
    # every weight but the input embedding's is read by a matmul (a tied one by the head)
    matmul_params = params["total"] - (0 if m.tie_embeddings else params["embedding"] / 2)
    bf16 = tr.precision == "bf16"
    loop_sum = 0.0
    if Recurrence.of(cfg).expected(step_samples(cfg))[1] > 1 and p == 1 \
            and lay.microbatches > 1:
        # made weight by weight as the last lap's backward frees that lap's activations
        loop_sum = max(0.0, params["looped_block"] / (t * p) * (2 if bf16 and t == 1 else 4)
                       - _last_lap_bytes(cfg, lay))
    mem = {"weights": per_gpu_params * 4, "grads": per_gpu_params * 4,
           "optimizer": per_gpu_params * 8 / (d if lay.zero else 1),
           "activations": activation_bytes(cfg, lay),
           "autocast_cache": 2 * matmul_params / (t * p) if bf16 else 0.0,
           "loop_grad_sum": loop_sum}
    # the widest weight's gradient as backward makes it: bf16 (2 B) and fp32 (4 B) at once
    widest = max((2 if m.mlp == "swiglu" else 1) * m.ffn_hidden_size,
                 (m.num_heads + 2 * m.num_kv_heads) * m.kv_channels,
                 m.vocab_size if p == 1 else 0) * m.hidden_size / t
    accumulates = (lay.microbatches > 1 or p > 1) and not loop_sum
    mem["grad_transient"] = widest * (6 if bf16 else 4) if accumulates else 0.0
    if tr.loss_chunk_tokens:  # one chunk's logits through its backward (a transient)
        per_logit = READOUT_BYTES_PER_LOGIT + (4 if m.logit_softcap else 0)
        chunk = (min(tr.loss_chunk_tokens, tr.seq_len) * lay.micro_batch * m.vocab_size / t
                 * per_logit)
        # the readout's backward runs before the block's: the chunk and the loop sums (or the
        # widest gradient) do not meet, the larger counts
        mem["readout_chunk"] = max(0.0, chunk - loop_sum - mem["grad_transient"])
    if lay.zero and d > 1:  # DeepSpeed: fp32 master and gradient partitions, reduce buckets
        mem["zero_buffers"] = (per_gpu_params * 8 / d
                               + cfg.parallel.grad_bucket_mb * 2**20 * (1 + overlapped))
    buckets = per_gpu_params * 4 if d > 1 and not lay.zero else 0.0
    if overlapped:  # filled during the last backward, as its loop sums are folded in
        mem["grad_buckets"] = buckets
        mem["loop_grad_sum"] = max(0.0, loop_sum - buckets)
    else:  # filled after backward: they count where they outgrow the backward's transients
        mem["grad_buckets"] = max(0.0, buckets - mem["activations"] - mem["autocast_cache"]
                                  - loop_sum)
    return mem


def _last_lap_bytes(cfg: Config, lay: Layout) -> float:
    """Activations the window's last lap keeps (nothing where every layer is recomputed)."""
    if cfg.train.recompute == "full":
        return 0.0
    m, t = cfg.model, lay.tp
    hidden, other = layer_elements(m, t, t > 1 and cfg.parallel.sequence_parallel,
                                   cfg.train.recompute == "selective")
    big, small = (4, 2) if cfg.train.precision == "bf16" else (4, 4)
    return m.num_layers / lay.pp * (hidden * big + other * small) * lay.micro_batch * cfg.train.seq_len


def estimate(cfg: Config, lay: Layout, gpu: Accelerator, global_batch: int) -> Estimate:
    m, s, tr = cfg.model, cfg.train.seq_len, cfg.train
    h, f = m.hidden_size, m.ffn_hidden_size
    r, k = Recurrence.of(cfg).expected(global_batch)  # loop steps, with a backward
    t, p, d = lay.tp, lay.pp, lay.dp
    params = count_parameters(m)
    per_gpu_params = gpu_params(m, params, t, p)
    tokens = lay.micro_batch * lay.microbatches * s  # per DP rank per step
    # -- compute (one model replica of t x p GPUs processes `tokens`) --
    q = m.num_heads * m.kv_channels
    reads = read_count(cfg)  # loop steps whose LM head and loss run (all, for the ELBO)
    reads_bwd = min(reads, k)  # the objectives read the last steps: inside the window
    passes = m.num_layers * r + m.prelude_layers + m.coda_layers * reads  # forward
    passes_bwd = m.num_layers * k + m.prelude_layers + m.coda_layers * reads_bwd
    again = _recomputed_share(cfg)  # recomputed forward, as a fraction of the layers' forward
    chunked = tr.loss_chunk_tokens > 0
    rate = 1.0 if tr.precision == "bf16" else TF32_RATE
    gemm = tokens * (layer_matmul_flops(m) * (passes + (2 + again) * passes_bwd) / t
                     + loop_flops(m) * (r + 2 * k))  # the family's modules: replicated over TP
    head = tokens * 2 * h * m.vocab_size * (reads + (2 + chunked) * reads_bwd) / t
    core_again = 1 if tr.recompute == "selective" else again
    attn = tokens * 2 * s * q * (passes + (2 + core_again) * passes_bwd) / t  # causal: half
    # executed: full scores, and FlashAttention's backward recomputes them (2.5 x the forward)
    attn_run = tokens * 4 * s * q * (passes + (2.5 + core_again) * passes_bwd) / t
    t_gemm = (_gemm_time(gemm, min(h, f / t, q / t), gpu)
              + _gemm_time(head, min(h, m.vocab_size / t), gpu)) / rate
    t_attn = attn / (gpu.peak_flops * rate * ATTENTION_EFFICIENCY)
    act_size = 2 if tr.precision == "bf16" else 4
    elementwise_bytes = tokens * (passes + (2 + again) * passes_bwd) * (12 * h + 3 * f) \
        * act_size / t + tokens * reads * LOSS_BYTES_PER_LOGIT * (1 + chunked / 3) * m.vocab_size / t
    t_elem = elementwise_bytes / (gpu.hbm_bw * ELEMENTWISE_BANDWIDTH)
    compute = (t_gemm + t_attn + t_elem) / p  # each stage does 1/p of the layers
    ops_mb, ops_step = eager_ops(cfg)
    t_launch = (ops_mb * lay.microbatches + ops_step) / p * LAUNCH_S
    # -- communication --
    act_bytes = lay.micro_batch * s * h * 2
    tp_calls = 2 * (passes + (1 + again) * passes_bwd)  # a recomputed forward repeats its own
    t_tp = _ring(act_bytes, t, gpu.intra_node_bw) * tp_calls / p * lay.microbatches
    sp = 2 if cfg.parallel.sequence_parallel else 1  # an all-reduce as all-gather + reduce-scatter
    comm = {"tp": act_bytes * tp_calls * sp / p * lay.microbatches if t > 1 else 0.0,
            "dp": per_gpu_params * 4 * (2 if lay.zero else 1) if d > 1 else 0.0}
    dp_bw = gpu.intra_node_bw if t * p * d <= gpu.per_node else gpu.inter_node_bw
    if lay.zero:
        reduce = _ring(per_gpu_params * 4, d, dp_bw) / 2  # reduce-scatter of fp32 gradients
        gather = _ring(per_gpu_params * 4, d, dp_bw) / 2  # all-gather of the updated weights
    else:
        reduce, gather = _ring(per_gpu_params * 4, d, dp_bw), 0.0  # all-reduce
    microbatch = compute / lay.microbatches  # forward 1/3, backward 2/3
    overlapped = cfg.parallel.overlap_grad_reduce and not Recurrence.of(cfg).varies  # step_engine
    if overlapped:
        t_dp = max(0.0, reduce - microbatch * 2 / 3) + max(0.0, gather - microbatch / 3)
    else:
        t_dp = reduce + gather
    bubble = (p - 1) / (r * lay.microbatches + p - 1) if p > 1 else 0.0
    shard = d if lay.zero else 1
    t_opt = per_gpu_params / shard * 32 / gpu.hbm_bw
    busy = max(compute + t_tp, t_launch)
    t_bubble = busy / (1 - bubble) - busy
    step = busy + t_bubble + t_dp + t_opt
    flops = run_flops_per_token(cfg) * tokens * d
    mfu = flops / (step * t * p * d * gpu.peak_flops)
    mem = memory_bytes(cfg, lay, overlapped, params)
    mem = {k: v / 2**30 for k, v in mem.items()}
    mem["total"] = sum(mem.values())
    why = check(cfg, lay, gpu, global_batch)
    if not why and mem["total"] > gpu.memory_gb * MEMORY_HEADROOM:
        why = (f"needs {mem['total']:.1f} GiB per GPU, over the "
               f"{gpu.memory_gb * MEMORY_HEADROOM:.1f} usable ({MEMORY_HEADROOM:.0%} of its "
               f"{gpu.memory_gb:.0f} GB; the rest: allocator and CUDA context)")
    return Estimate(lay, mem, {"compute": compute, "tp_comm": t_tp, "bubble": t_bubble,
                               "dp_comm_exposed": t_dp, "optimizer": t_opt, "launch": t_launch},
                    step, mfu, tokens * d / step, not why, why, (gemm + head + attn_run) / p, comm)


def realising_config(cfg: Config, lay: Layout) -> list[str]:
    """The overrides that run `lay` with this plan's assumptions (what `pretrain train` and
    `pretrain slurm submit` take after the config file)."""
    t, p = cfg.train, cfg.parallel
    out = [f"parallel.tensor={lay.tp}", f"parallel.pipeline={lay.pp}", f"parallel.data={lay.dp}",
           f"train.micro_batch_size={lay.micro_batch}", f"train.grad_accum_steps={lay.microbatches}",
           f"parallel.sequence_parallel={str(lay.tp > 1).lower()}",
           f"parallel.zero_stage={1 if lay.zero and lay.dp > 1 else 0}",
           f"train.recompute={t.recompute}", f"train.loss_chunk_tokens={t.loss_chunk_tokens}",
           f"train.precision={t.precision}",
           f"parallel.overlap_grad_reduce={str(p.overlap_grad_reduce).lower()}"]
    if t.recompute == "loops":
        out.append(f"train.recompute_keep_last_loops={t.recompute_keep_last_loops}")
    return out


def layouts(cfg: Config, gpus: int, global_batch: int) -> list[Layout]:
    out = []
    for tp in (1, 2, 4, 8):
        for pp in [x for x in range(1, cfg.model.num_layers + 1) if gpus % (tp * x) == 0]:
            dp = gpus // (tp * pp)
            if dp < 1 or global_batch % dp:
                continue
            for mb in (1, 2, 4, 8):
                if (global_batch // dp) % mb == 0:  # ZeRO shards AdamW's states, not Muon's
                    out.append(Layout(tp, pp, dp, mb, global_batch // (dp * mb),
                                      zero=cfg.optim.name != "muon"))
    return out


def plan(cfg: Config, gpus: int, gpu: Accelerator, global_batch: int) -> list[Estimate]:
    """Every candidate layout, feasible ones first, by predicted MFU."""
    ests = [estimate(cfg, lay, gpu, global_batch) for lay in layouts(cfg, gpus, global_batch)]
    return sorted(ests, key=lambda e: (not e.feasible, -e.mfu))


def megatron_gpt_1p7b(base: Config) -> Config:
    """Megatron-LM's smallest weak-scaling GPT (README, H100): vocabulary 131,072, sequence
    4096, hidden 2048, 24 layers, 16 heads, untied embeddings (1.74B parameters). Its GeLU MLP
    of 4h is matched in FLOPs and parameters by SwiGLU of 8h/3."""
    model = dataclasses.replace(base.model, vocab_size=131072, hidden_size=2048, num_layers=24,
                                num_heads=16, num_kv_heads=16, head_dim=0,
                                ffn_hidden_size=8 * 2048 // 3, loops=1, max_seq_len=4096,
                                tie_embeddings=False, prelude_layers=0, coda_layers=0)
    # Megatron's recipe for it: bf16, selective recompute, --overlap-grad-reduce
    train = dataclasses.replace(base.train, seq_len=4096, precision="bf16", recompute="selective",
                                loss_chunk_tokens=0)
    return dataclasses.replace(base, model=model, train=train,
                               parallel=dataclasses.replace(base.parallel, overlap_grad_reduce=True))
