"""`pretrain` command line: train, params, generate, data; run tools in cli_ops.py.

Exit status: 2 a configuration, data or checkpoint problem (one line naming the field, file or
shard; no traceback); 3 the loss diverged; 4 a peer rank died (named); 75 preempted by
SIGTERM/SIGUSR1 after a checkpoint was sealed (requeue and `--resume auto`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from core.exit_codes import EXIT_CONFIG, EXIT_DIVERGED, EXIT_PEER_LOST, EXIT_PREEMPTED
from data_pipeline.badinput import DataError
from pretrain.checkpoint import CheckpointError
from pretrain.cli_ops import add_decoding_flags, add_run_commands, parse_exit_rules
from pretrain.config import ConfigError, load_config
from pretrain.preemption import Preempted


def _train(args: argparse.Namespace) -> int:
    from parallelism.topology import shutdown
    from pretrain.model.flops import count_parameters
    from pretrain.train import Trainer, TrainingDiverged

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg)
    say = print if trainer.topo.is_main else (lambda *a, **k: None)
    m = cfg.model
    if "SLURM_JOB_ID" in os.environ:
        say(f"slurm job {os.environ['SLURM_JOB_ID']}, restart "
            f"{os.environ.get('SLURM_RESTART_COUNT', '0')}")
    say(f"looped LM: {m.num_layers} shared layers x {m.loops} loops, hidden {m.hidden_size}; "
          f"{count_parameters(m)['total']:,} parameters; "
          f"device {trainer.device}; {trainer.tokens_per_step:,} tokens/step; layout tensor "
          f"{trainer.topo.tp} x pipeline {trainer.topo.pp} x data {trainer.topo.dp}")
    resume = args.resume or ("auto" if "SLURM_JOB_ID" in os.environ else "none")
    try:
        if resume != "none":
            trainer.resume(resume)
        summary = trainer.fit()
    except TrainingDiverged as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except Preempted as e:
        shutdown(trainer.topo)
        say(f"pretrain: {e}; exit {EXIT_PREEMPTED} (requeue, then --resume auto)")
        return EXIT_PREEMPTED
    except RuntimeError:  # a collective failed: was it a dead peer?
        watchdog = trainer.topo.watchdog
        why = watchdog.diagnose() if watchdog is not None else None
        if why is None:
            raise
        print(f"pretrain: error: {why}", file=sys.stderr)
        return EXIT_PEER_LOST
    shutdown(trainer.topo)
    first = summary.history[0].loss if summary.history else float("nan")
    say(f"done: {summary.steps} steps, loss {first:.4f} -> {summary.final_loss:.4f}, "
        f"{summary.skipped_steps} skipped")
    say(f"TensorBoard logs: {summary.tensorboard_dir}  (tensorboard --logdir {summary.tensorboard_dir})")
    say(f"checkpoint: {summary.checkpoint}")
    return 0


def _params(args: argparse.Namespace) -> int:
    from pretrain.model.flops import count_parameters, run_flops_per_token

    cfg = load_config(args.config, args.overrides)
    report = count_parameters(cfg.model)
    report["flops_per_token"] = run_flops_per_token(cfg)
    report["loops"] = cfg.model.loops
    report["seq_len"] = cfg.train.seq_len
    print(json.dumps(report, indent=2))
    return 0


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pretrain.checkpoint.offline import load_model
    from pretrain.data import ByteTokenizer
    from pretrain.model.generate import generate

    (rule,) = parse_exit_rules([args.exit])
    overrides = [f"model.loops={args.loops}"] if args.loops else []
    cfg, model = load_model(args.checkpoint, overrides)
    if cfg.data.tokenizer:
        from data_pipeline.tokenizer import load_tokenizer

        hf = load_tokenizer(cfg.data.tokenizer)
        encode, decode = (lambda s: hf.encode(s, add_special_tokens=False).ids), hf.decode
    else:
        encode, decode = ByteTokenizer().encode, ByteTokenizer().decode
    prompt = torch.tensor([encode(args.prompt)])
    gen = generate(model, prompt, args.max_new_tokens, rule=rule, kv_cache=args.kv_cache,
                   temperature=args.temperature, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(cfg.train.seed))
    print(decode(gen.tokens[0].tolist()))
    print(f"average loops used per decoded token ({rule}): {gen.loops_used:.2f} of "
          f"{cfg.model.loops}; loops per token: {' '.join(map(str, gen.exit_steps[0].tolist()))}")
    print(f"KV cache ({args.kv_cache}): {gen.cache_bytes_per_token / 1024:.1f} KiB per token")
    return 0


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.shards import tokenize_to_shards

    m = tokenize_to_shards(args.input, args.output, args.tokenizer, shard_tokens=args.shard_tokens,
                           chunk_tokens=args.chunk_tokens, workers=args.workers,
                           text_field=args.text_field, eos_token=args.eos_token,
                           on_error=args.on_error, validation_fraction=args.validation_fraction)
    skipped = ", ".join(f"{n} {k}" for k, n in m.skipped.items()) or "none"
    print(f"{m.documents:,} documents -> {m.total_tokens:,} tokens ({m.dtype}) in "
          f"{len(m.shards)} shards at {args.output}; skipped: {skipped}")
    if m.validation:
        v = m.validation
        held = f"{args.output}/{v['path']}"
        print(f"held out: {v['documents']:,} documents, {v['tokens']:,} tokens at {held} "
              f"(train with data.validation=[{{path: {held}}}])")
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.badinput import BadInput
    from data_pipeline.documents import iter_documents
    from data_pipeline.tokenizer import train_bpe

    tok = train_bpe(iter_documents(args.input, BadInput(args.on_error), args.text_field),
                    args.vocab_size, args.output, args.eos_token)
    print(f"byte-level BPE with {tok.get_vocab_size()} tokens -> {args.output}")
    return 0


def _add_data_commands(sub) -> None:
    from data_pipeline.tokenizer import EOS_TOKEN

    data = sub.add_parser("data", help="tokenizers and webdataset shards").add_subparsers(
        dest="data_command", required=True)
    tok = data.add_parser("tokenize", help="tokenize text/jsonl(.gz/.zst) into webdataset shards")
    tok.add_argument("--tokenizer", required=True, help="tokenizer.json")
    tok.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard")
    tok.add_argument("--chunk-tokens", type=int, default=8192, help="tokens per tar member")
    tok.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    tok.add_argument("--validation-fraction", type=float, default=0.0,
                     help="share of documents held out (by content hash) into OUTPUT/validation")
    bpe = data.add_parser("train-tokenizer", help="train a byte-level BPE on the inputs")
    bpe.add_argument("--vocab-size", type=int, required=True)
    for p, fn in ((tok, _tokenize), (bpe, _train_tokenizer)):
        p.add_argument("--input", nargs="+", required=True, help="files or directories")
        p.add_argument("--output", required=True)
        p.add_argument("--text-field", default="text", help="JSON field holding the text")
        p.add_argument("--eos-token", default=EOS_TOKEN)
        p.add_argument("--on-error", choices=("raise", "skip"), default="raise")
        p.set_defaults(fn=fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, fn, helptext in (("train", _train, "train a looped LM"),
                               ("params", _params, "print parameter and FLOP counts as JSON")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--config", required=True, help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.loops=2")
        p.set_defaults(fn=fn)
        if name == "train":
            p.add_argument("--resume", default=None,
                           help="auto (newest complete checkpoint of train.out_dir), a checkpoint "
                                "or run directory, or none; default: auto under SLURM, else none")
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--exit", default="all", help="exit rule: gate:Q, delta:EPS, fixed:N or all")
    add_decoding_flags(g)
    g.add_argument("--loops", type=int, default=0, help="loop count (default: the trained one)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(fn=_generate)
    add_run_commands(sub)
    _add_data_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"pretrain: error: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
