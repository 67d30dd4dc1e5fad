"""`pretrain data ...`: tokenizers and webdataset shards; tokenisation as a SLURM job array
(`tokenize --tasks N --submit`, each task `data part`, then `data merge`) or its parts run here
one after another (`--local`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.config_schema import ConfigError
from pretrain.cli.flags import at_least


def _settings(args: argparse.Namespace):
    from data_pipeline.shards import Tokenizing

    return Tokenizing(str(args.tokenizer), shard_tokens=args.shard_tokens,
                      chunk_tokens=args.chunk_tokens, text_field=args.text_field,
                      eos_token=args.eos_token, on_error=args.on_error,
                      empty=args.empty_documents, validation_fraction=args.validation_fraction,
                      workers=args.workers)


def _summary(m, out: str) -> None:
    skipped = ", ".join(f"{n:,} {k}" for k, n in m.skipped.items()) or "none"
    print(f"{m.documents:,} documents -> {m.total_tokens:,} tokens ({m.dtype}) in "
          f"{len(m.shards)} shards at {out}; skipped: {skipped}")
    if m.validation:
        v = m.validation
        held = f"{out}/{v['path']}"
        print(f"held out: {v['documents']:,} documents, {v['tokens']:,} tokens at {held} "
              f"(train with data.validation=[{{path: {held}}}])")


def _tokenize(args: argparse.Namespace) -> int:
    from data_pipeline.shards import write_shards

    how = _settings(args)
    if args.submit or args.local:
        return _job(args, how)
    if args.tasks:
        raise ConfigError("--tasks: give --submit (a SLURM job array) or --local (the parts here)")
    _summary(write_shards(args.input, Path(args.output), how), args.output)
    return 0


def _job(args: argparse.Namespace, how) -> int:
    from data_pipeline.parts import PARTS, merge_parts, plan_job, tokenize_part

    if args.submit == args.local or args.tasks < 1:
        raise ConfigError("tokenize: give --tasks N with exactly one of --submit / --local")
    out = Path(args.output).resolve()
    how.tokenizer_path = str(Path(how.tokenizer_path).resolve())  # tasks run elsewhere
    inputs = [i if i.startswith("pipe:") else str(Path(i).absolute()) for i in args.input]
    plan = plan_job(inputs, out, how, args.tasks)
    print(f"plan: {len(plan['units'])} units in {args.tasks} parts -> {out / PARTS}")
    if args.local:
        for k in range(args.tasks):
            print(tokenize_part(out, k))
        _summary(merge_parts(out), args.output)
        return 0
    import json
    import shlex
    import sys

    from slurm.submit import JobSpec, render, sbatch

    spec = JobSpec(cpus_per_task=args.cpus_per_task or how.workers, time=args.time,
                   partition=args.partition, account=args.account,
                   array=f"0-{args.tasks - 1}" + (f"%{args.concurrent}" if args.concurrent else ""))
    parts_dir = out / PARTS
    cli = f"{shlex.quote(sys.executable)} -m pretrain.cli data"
    array = parts_dir / "tokenize.sbatch"
    array.write_text(render(spec, f"tokenize-{out.name}", parts_dir,
                            f"{cli} part {shlex.quote(str(out))} \"${{SLURM_ARRAY_TASK_ID}}\""))
    merge = parts_dir / "merge.sbatch"
    merge.write_text(render(JobSpec(time=args.time, partition=args.partition,
                                    account=args.account),
                            f"merge-{out.name}", parts_dir, f"{cli} merge {shlex.quote(str(out))}"))
    job = sbatch(array, parts_dir, array=True)
    after = sbatch(merge, parts_dir, after=job)
    (parts_dir / "jobs.json").write_text(json.dumps({"array": job, "merge": after}) + "\n")
    print(f"submitted job array {job} ({args.tasks} tasks) and merge job {after} (after it); "
          f"progress: pretrain status {out}; a failed or killed task: submit the same command "
          "again (finished parts are skipped)")
    return 0


def _part(args: argparse.Namespace) -> int:
    from data_pipeline.parts import tokenize_part

    print(tokenize_part(Path(args.output), args.part))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from data_pipeline.parts import merge_parts

    _summary(merge_parts(Path(args.output)), args.output)
    return 0


def _train_tokenizer(args: argparse.Namespace) -> int:
    from data_pipeline.badinput import BadInput
    from data_pipeline.documents import iter_documents
    from data_pipeline.tokenizer import train_bpe

    bad = BadInput(args.on_error)
    tok = train_bpe(iter_documents(args.input, bad, args.text_field, args.empty_documents,
                                   args.sample_bytes), args.vocab_size, args.output, args.eos_token)
    skipped = ", ".join(f"{n:,} {k}" for k, n in bad.counts.items()) or "none"
    print(f"byte-level BPE with {tok.get_vocab_size()} tokens -> {args.output}; skipped: {skipped}")
    return 0


def add_commands(sub) -> None:
    from data_pipeline.tokenizer import EOS_TOKEN

    data = sub.add_parser("data", help="tokenizers and webdataset shards").add_subparsers(
        dest="data_command", required=True)
    tok = data.add_parser("tokenize", help="tokenize text, JSON lines (.gz/.zst), Parquet or "
                                           "saved Arrow datasets into webdataset shards")
    tok.add_argument("--tokenizer", required=True, help="tokenizer.json")
    tok.add_argument("--shard-tokens", type=at_least(1), default=1 << 26, help="tokens per shard")
    tok.add_argument("--chunk-tokens", type=at_least(1), default=8192, help="tokens per tar member")
    tok.add_argument("--workers", type=at_least(1), default=1, help="tokenizer processes (per task)")
    tok.add_argument("--validation-fraction", type=float, default=0.0,
                     help="share of documents held out (by content hash) into OUTPUT/validation")
    tok.add_argument("--tasks", type=at_least(0), default=0, help="parts of a job array (with --submit "
                                                          "or --local)")
    tok.add_argument("--submit", action="store_true", help="submit the parts as a SLURM job "
                                                           "array and a merge job after it")
    tok.add_argument("--local", action="store_true", help="run the parts here, then merge")
    tok.add_argument("--time", default="04:00:00", help="SLURM time limit per task")
    tok.add_argument("--partition", default="", help="SLURM partition (--submit)")
    tok.add_argument("--account", default="", help="SLURM account (--submit)")
    tok.add_argument("--cpus-per-task", type=at_least(0), default=0, help="default: --workers")
    tok.add_argument("--concurrent", type=at_least(0), default=0, help="array tasks at once (0: any)")
    bpe = data.add_parser("train-tokenizer", help="train a byte-level BPE on the inputs")
    bpe.add_argument("--vocab-size", type=at_least(1), required=True,
                     help="ids in the tokenizer (>= 258: 256 bytes, EOS, merges)")
    bpe.add_argument("--sample-bytes", type=at_least(0), default=0,
                     help="train on a deterministic sample of about this much text, spread over "
                          "all inputs (0: everything)")
    for p, fn in ((tok, _tokenize), (bpe, _train_tokenizer)):
        p.add_argument("--input", nargs="+", required=True,
                       help="files, directories, glob patterns or pipe:COMMAND")
        p.add_argument("--output", required=True,
                       help="shard directory (tokenize) or tokenizer.json (train-tokenizer)")
        p.add_argument("--text-field", default="text", help="JSON field / column with the text")
        p.add_argument("--eos-token", default=EOS_TOKEN, help="the end-of-document token")
        p.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                       help="an unreadable record: stop naming it, or skip it (counted, logged)")
        p.add_argument("--empty-documents", choices=("skip", "error"), default="skip",
                       help="documents of only white space: skipped and counted, or an error")
        p.set_defaults(fn=fn)
    part = data.add_parser("part", help="tokenize one part of a planned job (an array task)")
    part.add_argument("output", help="the job's output directory")
    part.add_argument("part", type=at_least(0))
    part.set_defaults(fn=_part)
    merge = data.add_parser("merge", help="merge a job's finished parts into shards + manifest")
    merge.add_argument("output")
    merge.set_defaults(fn=_merge)
