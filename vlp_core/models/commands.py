"""`vlp` sub-commands of vlp_core.models (registered by vlp_core.cli).

    vlp export --model DIR --as captioner|filter --out DIR   a vlp checkpoint -> a Hugging Face BLIP folder
    vlp import --hf DIR --out DIR                             a Hugging Face BLIP folder -> a vlp checkpoint

See :mod:`vlp_core.models.hf` (only BLIP-shaped timm ViT backbones export).
"""
from __future__ import annotations

import argparse


def _cmd_export(args: argparse.Namespace) -> int:
    from vlp_core.models.hf import CAPTIONER_CLASS, FILTER_CLASS, export_captioner, export_filter

    fn, cls = (export_captioner, CAPTIONER_CLASS) if args.as_ == "captioner" else (export_filter, FILTER_CLASS)
    out = fn(args.model, args.out)
    print(f"exported {args.model} as a Hugging Face {cls} folder: {out}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from vlp_core.models.hf import import_hf

    model = import_hf(args.hf)
    out = model.save_pretrained(args.out)
    cfg = model.config
    print(f"imported {args.hf} as a vlp checkpoint: {out} (vision {cfg.vision} {cfg.vision_kwargs}, "
          f"{cfg.image_size} px, text {cfg.num_hidden_layers}x{cfg.hidden_size}, vocab {cfg.vocab_size})")
    return 0


def register(subparsers) -> None:
    """Add this package's sub-commands.  Heavy imports go inside the handlers."""
    p = subparsers.add_parser("export", help="export a vlp checkpoint as a Hugging Face BLIP folder")
    p.add_argument("--model", required=True, help="vlp model folder (or a training output holding model/)")
    p.add_argument("--as", dest="as_", required=True, choices=["captioner", "filter"],
                   help="captioner: BlipForConditionalGeneration; filter: BlipForImageTextRetrieval")
    p.add_argument("--out", required=True, help="output folder (config, weights, tokenizer, preprocessor config)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("import", help="import a Hugging Face BLIP folder as a vlp checkpoint")
    p.add_argument("--hf", required=True, help="local BlipForConditionalGeneration or BlipForImageTextRetrieval folder")
    p.add_argument("--out", required=True, help="output vlp model folder (save_pretrained)")
    p.set_defaults(func=_cmd_import)
