"""`pretrain generate` and `pretrain eval`: decoding with early exit, and held-out loss per
loop step and exit rule through the same path."""

from __future__ import annotations

import argparse
import math

from pretrain.config import ConfigError


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pretrain.checkpoint.offline import load_model
    from pretrain.data import ByteTokenizer
    from pretrain.model.generate import generate

    (rule,) = _parse_exit_rules([args.exit])
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


def _eval(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.offline import load_model
    from pretrain.evaluate import exit_table

    overrides = []
    if args.data:  # shards to measure instead of the run's data.validation
        overrides = ["data.source=shards", f"data.sources=[{{path: {args.data}}}]",
                     f"data.validation=[{{path: {args.data}}}]"]
    rules = _parse_exit_rules(args.exit)
    cfg, model = load_model(args.checkpoint, overrides)
    table = exit_table(cfg, model, args.batches, rules, args.kv_cache, args.prefill)
    print(f"data: {table['data']}")
    print(f"held-out tokens: {table['tokens']:,} (after a prefill of {args.prefill} per sequence)")
    print(f"{'loop step':>10} | {'CE':>7} | {'ppl':>8}")
    for step, ce in table["steps"]:
        print(f"{step:>10} | {ce:7.4f} | {math.exp(ce):8.2f}")
    print(f"{'exit rule':>10} | {'CE':>7} | {'ppl':>8} | loops used (of {cfg.model.loops}), "
          f"decoded with the {args.kv_cache} KV cache")
    for rule, ce, loops in table["exits"]:
        print(f"{rule:>10} | {ce:7.4f} | {math.exp(ce):8.2f} | {loops:.2f}")
    return 0


def _parse_exit_rules(texts: list[str]):
    """--exit values as ExitRules; a bad one is a one-line error naming the flag."""
    from pretrain.model.generate import ExitRule

    try:
        return tuple(ExitRule.parse(t) for t in texts)
    except ValueError as e:
        raise ConfigError(f"--exit: {e}") from None


def _add_decoding_flags(p) -> None:
    """The KV-cache policy flag shared by `generate` and `eval` (model/generate.py)."""
    p.add_argument("--kv-cache", choices=("full", "last", "average"), default="full",
                   help="while decoding: a cache per loop, or one (last step / mean over steps)")


def add_commands(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--exit", default="all", help="exit rule: gate:Q, delta:EPS, fixed:N or all")
    _add_decoding_flags(g)
    g.add_argument("--loops", type=int, default=0, help="loop count (default: the trained one)")
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.set_defaults(fn=_generate)
    ev = sub.add_parser("eval", help="held-out loss per loop step and per early-exit rule")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", default="", help="held-out shards directory (default: the run's "
                                               "data.validation)")
    ev.add_argument("--batches", type=int, default=8)
    ev.add_argument("--exit", nargs="+", default=["gate:0.3", "gate:0.5", "gate:0.7", "gate:0.9"],
                    help="exit rules: gate:Q (cumulative exit probability), delta:EPS "
                         "(|h_t - h_t-1| < EPS), fixed:N, all")
    _add_decoding_flags(ev)
    ev.add_argument("--prefill", type=int, default=0,
                    help="tokens of each sequence prefilled (every loop) before decoding")
    ev.set_defaults(fn=_eval)
