"""`vlp` sub-commands of vlp_core.train (registered by vlp_core.cli).

    vlp pretrain --train SRC [--train SRC ...] --out DIR [--init DIR] [--fresh]
    vlp finetune --target captioner|filter --init DIR --train SRC [--train SRC ...] --out DIR [--fresh]
    vlp retrain --train SRC [--train SRC ...] --base DIR --out DIR [--fresh]
    vlp evaluate --model DIR --test SRC [--ground-truth W/ground_truth.parquet] --out DIR

``SRC`` is ``path[:source]`` with source one of web|synthetic|human (default web): an ingest
manifest (or its folder), a CapFilt corpus (file, folder, or stage folder holding corpus/),
or a synthetic world URL list (``W/<split>.parquet``).  All accept ``--params`` / ``-S``.
Heavy imports (torch, the model) happen inside the handlers so ``vlp --help`` stays fast.
"""
from __future__ import annotations

import argparse
import json


def _add_params(p: argparse.ArgumentParser) -> None:
    from vlp_core.cli import add_params_args

    add_params_args(p)


def _sources(specs: list[str]):
    from vlp_core.train.data import parse_source

    return [parse_source(s) for s in specs]


def _print_stats(stats) -> None:
    extra = stats.extra
    skipped = {k: v for k, v in stats.counts.items() if k.startswith("skipped.")}
    print(f"{stats.stage}: {stats.rows_in} pairs read, {stats.counts.get('used', 0)} used, "
          f"{sum(skipped.values())} skipped {skipped or ''}".rstrip())
    print(f"steps {extra.get('steps')}/{extra.get('target_steps')} (resumed from {extra.get('resumed_from_step')}), "
          f"{extra.get('samples_per_s')} samples/s, final losses {extra.get('final_losses')}")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args
    from vlp_core.train.loop import run_pretrain

    stats = run_pretrain(load_params_from_args(args), _sources(args.train), args.out, init_from=args.init,
                         fresh=args.fresh)
    _print_stats(stats)
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args
    from vlp_core.train.loop import run_finetune

    stats = run_finetune(load_params_from_args(args), args.target, _sources(args.train), args.init, args.out,
                         fresh=args.fresh)
    _print_stats(stats)
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args
    from vlp_core.train.loop import run_retrain

    stats = run_retrain(load_params_from_args(args), _sources(args.train), args.base, args.out, fresh=args.fresh)
    _print_stats(stats)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args
    from vlp_core.train.evaluate import run_evaluate

    metrics = run_evaluate(load_params_from_args(args), args.model, args.test, args.out,
                           ground_truth=args.ground_truth)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}, indent=1))
    return 0


def register(subparsers) -> None:
    """Add ``pretrain``, ``finetune`` and ``evaluate``."""
    fresh_help = ("delete the out folder's checkpoint and model first (a rerun otherwise resumes, and only "
                  "when the settings, sources and model are those the checkpoint was trained with)")
    src_help = "training pairs: path[:web|synthetic|human] (manifest, corpus or world URL list); repeatable"
    p = subparsers.add_parser("pretrain", help="pretrain the BLIP MED model (ITC + ITM + LM)")
    p.add_argument("--train", action="append", required=True, metavar="SRC", help=src_help)
    p.add_argument("--out", required=True, help="output folder (model/, checkpoint/, loss.csv, stats.json)")
    p.add_argument("--init", default=None, help="start from this model folder (default: model.init_from or new)")
    p.add_argument("--fresh", action="store_true", help=fresh_help)
    _add_params(p)
    p.set_defaults(func=_cmd_pretrain)

    p = subparsers.add_parser("finetune", help="fine-tune a model into the captioner or the filter")
    p.add_argument("--target", required=True, choices=["captioner", "filter"])
    p.add_argument("--init", required=True, help="the model folder to start from")
    p.add_argument("--train", action="append", required=True, metavar="SRC", help=src_help)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fresh", action="store_true", help=fresh_help)
    _add_params(p)
    p.set_defaults(func=_cmd_finetune)

    p = subparsers.add_parser("retrain", help="retrain on a bootstrapped corpus: from scratch, or continuing the "
                                              "round's base model (retrain.init)")
    p.add_argument("--train", action="append", required=True, metavar="SRC", help=src_help)
    p.add_argument("--base", default=None, help="the round's base model (used when retrain.init is continue)")
    p.add_argument("--out", required=True, help="output folder (model/, checkpoint/, loss.csv, stats.json)")
    p.add_argument("--fresh", action="store_true", help=fresh_help)
    _add_params(p)
    p.set_defaults(func=_cmd_retrain)

    p = subparsers.add_parser("evaluate", help="retrieval R@k (ITC + ITM re-rank), ITM accuracy, BLEU-4, CIDEr")
    p.add_argument("--model", required=True, help="the model folder")
    p.add_argument("--test", required=True, metavar="SRC", help="test pairs: path[:source]")
    p.add_argument("--ground-truth", default=None,
                   help="synthetic world ground truth (W/ground_truth.parquet) for caption accuracy")
    p.add_argument("--out", required=True, help="output folder (metrics.json, captions.parquet)")
    _add_params(p)
    p.set_defaults(func=_cmd_evaluate)
