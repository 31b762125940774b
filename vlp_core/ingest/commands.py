"""`vlp ingest --urls FILE --out DIR [--retry-failed]` (registered by vlp_core.cli)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add this package's sub-commands.  Heavy imports go inside the handlers."""
    from vlp_core.cli import add_params_args

    p = subparsers.add_parser(
        "ingest", help="download a URL list into img2dataset shards and write a manifest",
        description="Read a URL list (parquet, csv, tsv, jsonl or txt), validate it, download it with "
                    "img2dataset and write DIR/manifest.parquet with one row per input row.",
    )
    p.add_argument("--urls", required=True, help="URL list file")
    p.add_argument("--out", required=True, help="output directory (shards/ and manifest.parquet)")
    p.add_argument("--retry-failed", action="store_true",
                   help="after finishing the run in --out, download again (into new shards) only the rows that "
                        "failed for a transient reason (timeout, HTTP 5xx, connection refused / reset / dropped) "
                        "and merge them into the manifest; the same as -S ingest.retry_failed=true")
    add_params_args(p)
    p.set_defaults(func=_ingest)


def _ingest(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args
    from vlp_core.config import ConfigError
    from vlp_core.ingest.stage import run_ingest, summary_table

    params = load_params_from_args(args)
    if args.retry_failed:
        if not params.ingest.incremental:
            raise ConfigError("--retry-failed", "ingest.incremental",
                              "must be true to retry (a retry adds shards to the earlier run's; false deletes them)")
        params = params.replace(**{"ingest.retry_failed": True})
    stats = run_ingest(params, args.urls, args.out)
    print(f"\ningest {args.urls} -> {args.out}/manifest.parquet")
    print(summary_table(stats))
    return 0
