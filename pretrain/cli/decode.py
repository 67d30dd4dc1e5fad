"""`pretrain generate` and `pretrain eval`: decoding with early exit; downstream tasks through
lm-eval (pretrain/downstream) and held-out loss and bits per byte, per loop count and exit
rule, through the same decoding path."""

from __future__ import annotations

import argparse
import math

from core.config_schema import ConfigError
from pretrain.cli.flags import at_least, probability


def _generate(args: argparse.Namespace) -> int:
    import torch

    from pretrain.checkpoint.offline import load_model
    from pretrain.model.generate import generate
    from pretrain.text import TextCodec

    (rule,) = _parse_exit_rules([args.exit])
    cfg, model = load_model(args.checkpoint, [("model.loops", args.loops)] if args.loops else [])
    codec = TextCodec.of(cfg.data.tokenizer)
    encode, decode = codec.encode, codec.decode
    ids = encode(args.prompt)
    if not ids:
        raise ConfigError("--prompt: empty (it encodes to no tokens; give some text)")
    if len(ids) + args.max_new_tokens > cfg.model.max_seq_len:
        raise ConfigError(f"--prompt: {len(ids)} tokens + --max-new-tokens {args.max_new_tokens} "
                          f"exceed the model's max_seq_len {cfg.model.max_seq_len}")
    prompt = torch.tensor([ids])
    gen = generate(model, prompt, args.max_new_tokens, rule=rule, kv_cache=args.kv_cache,
                   temperature=args.temperature, top_p=args.top_p,
                   generator=torch.Generator().manual_seed(cfg.train.seed),
                   stop=codec.stop_when(args.stop) if args.stop else None)
    print(decode(gen.tokens[0].tolist()))
    print(f"average loops used per decoded token ({rule}): {gen.mean_loops:.2f} of "
          f"{cfg.model.loops}; loops per token: {' '.join(map(str, gen.loops_used[0].tolist()))}")
    print(f"KV cache ({args.kv_cache}): {gen.cache_bytes_per_token / 1024:.1f} KiB per token")
    return 0


def _eval(args: argparse.Namespace) -> int:
    loops = args.loops or []  # each >= 1 (checked where argparse reads them)
    if args.tasks:
        return _downstream(args, loops)
    from pretrain.checkpoint.offline import load_model, refuse_shell_commands
    from pretrain.evaluate import exit_table

    overrides = [("model.loops", max(loops))] if loops else []
    if args.data:  # shards to measure instead of the run's data.validation
        overrides += [("data.source", "shards"), ("data.sources", [{"path": args.data}]),
                      ("data.validation", [{"path": args.data}])]
    elif not args.allow_commands:
        refuse_shell_commands(args.checkpoint, "eval", "pass --data DIR, or --allow-commands "
                                                       "to run it")
    rules = _parse_exit_rules(args.exit or ["gate:0.3", "gate:0.5", "gate:0.7", "gate:0.9"])
    cfg, model = load_model(args.checkpoint, overrides)
    table = exit_table(cfg, model, args.batches, rules, args.kv_cache, args.prefill)
    print(f"data: {table['data']}")
    print(f"held-out tokens: {table['tokens']:,.0f} (after a prefill of {args.prefill} per "
          f"sequence), {table['bytes']:,.0f} bytes of text")
    print(f"{'loop step':>10} | {'CE':>7} | {'ppl':>8} | {'bpb':>6}")
    for t in range(1, cfg.model.loops + 1):
        ce = table[f"ce_step{t}"]
        print(f"{t:>10} | {ce:7.4f} | {math.exp(ce):8.2f} | {table[f'bpb_step{t}']:6.4f}")
    print(f"{'exit rule':>10} | {'CE':>7} | {'ppl':>8} | {'bpb':>6} | loops used (of "
          f"{cfg.model.loops}) | decoded with the {args.kv_cache} KV cache: CE, bpb, loops used")
    for rule in map(str, rules):
        ce = table[f"ce_exit_{rule}"]
        print(f"{rule:>10} | {ce:7.4f} | {math.exp(ce):8.2f} | {table[f'bpb_exit_{rule}']:6.4f} | "
              f"{table[f'loops_exit_{rule}']:.2f} | {table[f'ce_decoded_{rule}']:7.4f} | "
              f"{table[f'bpb_decoded_{rule}']:6.4f} | {table[f'loops_decoded_{rule}']:.2f}")
    return 0


def _downstream(args: argparse.Namespace, loops: list[int]) -> int:
    """lm-eval tasks at every (loop count, exit rule); tasks load before the model."""
    from pathlib import Path

    from parallelism.topology import join_replicas
    from pretrain.checkpoint import store
    from pretrain.checkpoint.compat import saved_config
    from pretrain.checkpoint.offline import load_model
    from pretrain.downstream.report import table, write_report
    from pretrain.downstream.run import evaluate_model
    from pretrain.downstream.tasks import load_tasks

    rules = list(_parse_exit_rules(args.exit or ["all"]))
    for rule in rules:
        if rule.kind == "kl":
            raise ConfigError(f"--exit {rule}: a kl rule reads every step's full logits; it "
                              "runs on held-out data (eval without --tasks) and in generate")
    tasks = load_tasks(args.tasks.split(","), args.num_fewshot, args.include_path)
    path = store.resolve(args.checkpoint)
    trained = saved_config(path).model.loops
    loops = loops or [trained]
    topo = join_replicas(args.device)
    cfg, model = load_model(path, [("model.loops", max(loops))] if max(loops) != trained else [])
    results = evaluate_model(cfg, model.to(topo.device), tasks, loops, rules, args.kv_cache,
                             args.batch_size, args.limit, args.bootstrap_iters)
    if topo.is_main:
        out = Path(args.output) if args.output else path.parent.parent / "downstream" / path.name
        write_report(out, results)
        print(table(results))
        print(f"results, table and Pareto plot: {out}")
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
    g.add_argument("--checkpoint", required=True,
                   help="run directory, checkpoints root, `latest` or a step directory")
    g.add_argument("--prompt", required=True, help="text to continue")
    g.add_argument("--max-new-tokens", type=at_least(1), default=64, help="tokens to generate")
    g.add_argument("--exit", default="all",
                   help="exit rule: gate:Q, delta:EPS, kl:EPS (Huginn), fixed:N or all")
    _add_decoding_flags(g)
    g.add_argument("--loops", type=at_least(0), default=0, help="loop count (default: the trained one)")
    g.add_argument("--temperature", type=at_least(0.0, float), default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=probability, default=1.0,
                   help="nucleus sampling: the smallest set of tokens holding this probability")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end once the new text holds TEXT or EOS (repeatable)")
    g.set_defaults(fn=_generate)
    ev = sub.add_parser("eval", help="downstream tasks (lm-eval) or held-out loss, per loop "
                                     "count and early-exit rule")
    ev.add_argument("--checkpoint", required=True, help="checkpoint of any layout")
    ev.add_argument("--tasks", default="", help="lm-eval tasks, comma-separated: registry names "
                                                "(hellaswag,arc_easy) or task YAML files")
    ev.add_argument("--include-path", default="", help="directory of extra lm-eval task YAMLs")
    ev.add_argument("--num-fewshot", type=at_least(0), default=None,
                    help="few-shot examples per --tasks prompt (default: each task's own)")
    ev.add_argument("--limit", type=at_least(1), default=None, help="documents per task (for testing)")
    ev.add_argument("--loops", type=at_least(1), nargs="+", default=None,
                    help="loop counts to evaluate (default: the trained one)")
    ev.add_argument("--exit", nargs="+", default=None,
                    help="exit rules: gate:Q (cumulative exit probability), delta:EPS "
                         "(|h_t - h_t-1| < EPS), kl:EPS (KL of successive steps' next-token "
                         "distributions < EPS; held-out data), fixed:N, all (default: all with "
                         "--tasks, gate:0.3..0.9 on held-out data)")
    _add_decoding_flags(ev)
    ev.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per forward (--tasks)")
    ev.add_argument("--bootstrap-iters", type=at_least(0), default=100000,
                    help="lm-eval's bootstrap samples for stderr (0: none)")
    ev.add_argument("--output", default="", help="results directory (default: <run>/downstream/"
                                                 "<step>)")
    ev.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="where --tasks runs (auto: cuda when present)")
    ev.add_argument("--data", default="", help="held-out shards directory (default: the run's "
                                               "data.validation)")
    ev.add_argument("--batches", type=at_least(1), default=8, help="held-out micro-batches")
    ev.add_argument("--allow-commands", action="store_true",
                    help="run the pipe: url_templates of the checkpoint's data config (a "
                         "checkpoint from elsewhere may name any command)")
    ev.add_argument("--prefill", type=at_least(0), default=0,
                    help="held-out: tokens of each sequence prefilled (every loop) before decoding")
    ev.set_defaults(fn=_eval)
