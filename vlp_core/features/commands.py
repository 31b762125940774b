"""`vlp` sub-commands of vlp_core.features (registered by vlp_core.cli).

    vlp features --corpus DIR --model DIR --out DIR

``--corpus`` is a CapFilt output folder (or its ``corpus/``), ``--model`` the filter (a vlp
checkpoint or a local HF ``BlipForImageTextRetrieval`` folder) whose ITC projections become
the embeddings.  Heavy imports stay inside the handler so ``vlp --help`` stays fast.
"""
from __future__ import annotations

import argparse
import os


def _cmd_features(args: argparse.Namespace) -> int:
    import torch

    from vlp_core.cli import load_params_from_args
    from vlp_core.features.stage import run_features

    params = load_params_from_args(args)
    torch.set_num_threads(int(os.environ.get("TORCH_NUM_THREADS", "2")))
    stats = run_features(params, args.corpus, args.model, args.out, device=args.device)
    c = stats.counts
    print(f"features: {stats.rows_out} rows, {c.get('images', 0)} images; exact duplicates "
          f"{c.get('exact_dup_images', 0)}, near duplicates {c.get('near_dup_images', 0)} "
          f"(cosine > {stats.extra['near_dup_threshold']}); shards {stats.shards_done} done, "
          f"{stats.shards_skipped} resumed; reused CapFilt embeddings for {c.get('reused_capfilt_embeddings', 0)} rows")
    return 0


def register(subparsers) -> None:
    """``vlp features``."""
    from vlp_core.cli import add_params_args

    p = subparsers.add_parser("features", help="image/text embeddings and duplicate flags of a CapFilt corpus",
                              description="Embeddings (the filter's ITC projections, optionally a timm backbone) "
                                          "and exact/near duplicate flags for every corpus row.")
    p.add_argument("--corpus", required=True, help="capfilt output folder (or its corpus/)")
    p.add_argument("--model", required=True, help="model folder (vlp checkpoint or HF BlipForImageTextRetrieval)")
    p.add_argument("--out", required=True, help="output folder (embeddings/, stats.json)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    add_params_args(p)
    p.set_defaults(func=_cmd_features)
