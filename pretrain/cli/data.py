"""`pretrain data ...`: tokenizers and webdataset shards."""

from __future__ import annotations

import argparse


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


def add_commands(sub) -> None:
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
