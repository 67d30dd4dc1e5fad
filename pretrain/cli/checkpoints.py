"""`pretrain export`, `import` and `checkpoint convert|grow`: checkpoints in and out."""

from __future__ import annotations

import argparse
import json

from core.config_schema import ConfigError
from pretrain.cli.flags import at_least


def _claim(args: argparse.Namespace, what: str) -> None:
    """The output directory is new or empty, or --overwrite moves the old one aside."""
    from pretrain.run.run_dir import claim_output

    note = claim_output(args.out, args.overwrite, what)
    if note:
        print(note)


def _export(args: argparse.Namespace) -> int:
    from pretrain.formats.hf import export

    _claim(args, "an export")
    out = export(args.checkpoint, args.out)
    config = json.loads((out / "config.json").read_text())
    layout = config.get("model_type") or config["_class_name"]
    print(f"Hugging Face ({layout} layout): {out / 'model.safetensors'}, {out / 'config.json'}")
    return 0


def _import(args: argparse.Namespace) -> int:
    from pretrain.formats.hf import import_hf

    _claim(args, "a run directory")
    ckpt = import_hf(args.hf, args.out, args.config, args.allow_nonfinite)
    print(f"imported {args.hf} -> {ckpt}; continue pretraining with: pretrain train --config "
          f"{args.out}/config.yaml --resume {ckpt}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.offline import consolidate

    layout = dict(kv.split("=", 1) for kv in args.to_layout.split(",") if "=" in kv)
    if set(layout) - {"tp", "pp", "dp"} or any(v != "1" for v in layout.values()):
        raise ConfigError(f"--to-layout: {args.to_layout!r}: only tp=1,pp=1 (consolidation) is "
                          "written offline; every layout resumes any checkpoint directly")
    _claim(args, "a checkpoints root")
    print(f"consolidated checkpoint: {consolidate(args.checkpoint, args.out)}")
    return 0


def _grow(args: argparse.Namespace) -> int:
    from pretrain.checkpoint.grow import grow

    _claim(args, "a checkpoints root")
    out = grow(args.source, args.layers, args.out, args.order, args.overrides)
    print(f"grown to {args.layers} shared layers ({args.order}): {out}; continue with "
          f"pretrain train --config {out / 'config.yaml'} --resume {out}")
    return 0


def add_commands(sub) -> None:
    ex = sub.add_parser("export", help="checkpoint -> Hugging Face safetensors + config (Ouro's "
                                             "layout; Huginn's for loop_mode huginn)")
    ex.add_argument("--checkpoint", required=True,
                    help="run directory, checkpoints root, `latest` or a step directory")
    ex.add_argument("--out", required=True, help="directory to write (missing or empty)")
    ex.set_defaults(fn=_export)
    im = sub.add_parser("import", help="Hugging Face (Ouro or Huginn) weights -> a step-0 checkpoint")
    im.add_argument("--hf", required=True, help="directory with config.json + *.safetensors")
    im.add_argument("--out", required=True, help="run directory to create")
    im.add_argument("--config", default=None, help="base run config (model fields come from HF)")
    im.add_argument("--allow-nonfinite", action="store_true",
                    help="import weights holding NaN or Inf as they are (refused by default)")
    im.set_defaults(fn=_import)
    tools = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(
        dest="checkpoint_command", required=True)
    conv = tools.add_parser("convert", help="consolidate a sharded checkpoint into one file of "
                                            "full tensors")
    conv.add_argument("checkpoint", help="checkpoint, checkpoints root or run directory")
    conv.add_argument("--to-layout", default="tp=1,pp=1",
                      help="the layout to write: tp=T,pp=P (the shards one rank of it holds)")
    conv.add_argument("--out", required=True, help="checkpoints root to write into")
    conv.set_defaults(fn=_convert)
    gr = tools.add_parser("grow", help="upcycle to a deeper shared block by layer duplication")
    gr.add_argument("--from", dest="source", required=True, help="checkpoint (any layout)")
    gr.add_argument("--layers", type=at_least(1), required=True, help="new model.num_layers (a multiple)")
    gr.add_argument("--order", default="stack", help="stack (l0..lL-1 repeated) or interleave")
    gr.add_argument("--out", required=True, help="checkpoints root to write into")
    gr.add_argument("overrides", nargs="*", help="config changes for the grown run, e.g. "
                                                 "model.loops=4 objective.beta=0.05")
    gr.set_defaults(fn=_grow)
    for p in (ex, im, conv, gr):
        p.add_argument("--overwrite", action="store_true",
                       help="--out may exist and hold files: it is moved aside (renamed)")
