"""`vlp versions|query|report|record` sub-commands (registered by vlp_core.cli).

    vlp record --name round0 --corpus data/round0/capfilt --stats data/round0/*/stats.json \\
               --metrics data/round0/evaluate/metrics.json
    vlp versions list                 # with each version's gate state (promoted / rejected) and why
    vlp versions diff round0 round1 [--examples 10] [--json]
    vlp query "SELECT source, avg(itm) FROM corpus WHERE version='round1' GROUP BY 1"
    vlp report --out report/index.html

The catalog file is ``catalog.path`` of params.yaml (``--catalog`` overrides it).
"""
from __future__ import annotations

import argparse
import json


def _catalog_arg(p: argparse.ArgumentParser) -> None:
    from vlp_core.cli import add_params_args

    p.add_argument("--catalog", default=None, help="catalog file (default: catalog.path of params.yaml)")
    add_params_args(p)


def _catalog_file(args: argparse.Namespace) -> str:
    if args.catalog:
        return args.catalog
    from vlp_core.cli import load_params_from_args

    return load_params_from_args(args).catalog.path


def register(subparsers) -> None:
    """Add ``versions``, ``query``, ``report`` and ``record``."""
    p = subparsers.add_parser("versions", help="list or compare the versions in the catalog")
    sub = p.add_subparsers(dest="versions_command", metavar="ACTION")
    sub.required = True
    lp = sub.add_parser("list", help="every recorded version with its rows, kept rows, metrics and gate state "
                                     "(promoted / rejected, and why)")
    _catalog_arg(lp)
    lp.set_defaults(func=_list)
    dp = sub.add_parser("diff", help="what changed from version A to version B")
    dp.add_argument("a")
    dp.add_argument("b")
    dp.add_argument("--examples", type=int, default=5, help="changed captions to show (default 5)")
    dp.add_argument("--json", action="store_true", help="print the diff as JSON")
    _catalog_arg(dp)
    dp.set_defaults(func=_diff)

    q = subparsers.add_parser("query", help="run one read-only SQL query (SELECT/WITH) on the catalog",
                              description="Tables: versions, stage_stats, metrics, corpus, version_states. Writes "
                                          "are refused; a query is stopped after catalog.query_timeout_seconds.")
    q.add_argument("sql")
    q.add_argument("--limit", type=int, default=None, help="print at most this many rows")
    q.add_argument("--json", action="store_true", help="print rows as JSON lines")
    _catalog_arg(q)
    q.set_defaults(func=_query)

    r = subparsers.add_parser("report", help="write a self-contained HTML report of the versions")
    r.add_argument("--out", default="report/index.html", help="HTML file (default report/index.html)")
    r.add_argument("--version", dest="versions", action="append", default=None,
                   help="only these versions (repeatable; default all)")
    r.add_argument("--samples", type=int, default=8, help="sample images to show (default 8)")
    _catalog_arg(r)
    r.set_defaults(func=_report)

    rec = subparsers.add_parser("record", help="record a version (corpus snapshot, stats, metrics, git/DVC hashes)")
    rec.add_argument("--name", required=True,
                     help="version name, e.g. round0 (inside `dvc exp run`: round0+<experiment name>)")
    rec.add_argument("--corpus", default=None, help="CapFilt stage folder (or corpus folder/file)")
    rec.add_argument("--stats", nargs="*", default=[], help="stats.json files of the stages")
    rec.add_argument("--metrics", nargs="*", default=[], help="metrics.json files")
    rec.add_argument("--round", type=int, default=None, help="round number (default: from the corpus)")
    rec.add_argument("--repo", default=".", help="git/DVC repo to read the revision and hashes from")
    rec.add_argument("--marker", default=None, help="also write this JSON file (a DVC out) summarising the record")
    rec.add_argument("--state", choices=("promoted", "rejected"), default=None,
                     help="the quality gate's verdict on the version (default: none recorded)")
    rec.add_argument("--reason", default=None, help="why (with --state)")
    _catalog_arg(rec)
    rec.set_defaults(func=_record)


def _list(args: argparse.Namespace) -> int:
    from vlp_core.catalog import format_table, list_versions

    rows = list_versions(_catalog_file(args))
    cols = ["name", "created", "round", "git_rev", "rows", "kept", "state", "metrics", "reason"]
    print(format_table(cols, [[d["name"], str(d["created"])[:19], d["round"], (d["git_rev"] or "-")[:12],
                               d["rows"], d["kept"], d["state"] or "-",
                               ", ".join(f"{k}={v:.3f}" for k, v in list(d["metrics"].items())[:4]),
                               d["state_reason"] or ("-" if d["state"] else "recorded without a gate verdict")]
                              for d in rows], max_width=120))
    return 0


def _diff(args: argparse.Namespace) -> int:
    from vlp_core.catalog import diff_versions, format_diff

    d = diff_versions(_catalog_file(args), args.a, args.b, n_examples=args.examples)
    print(json.dumps(d.to_dict(), indent=1, default=str) if args.json else format_diff(d))
    return 0


def _query(args: argparse.Namespace) -> int:
    from vlp_core.catalog import format_table, query
    from vlp_core.cli import load_params_from_args

    params = load_params_from_args(args)
    cols, rows = query(args.catalog or params.catalog.path, args.sql, limit=args.limit,
                       timeout=params.catalog.query_timeout_seconds)
    if args.json:
        for r in rows:
            print(json.dumps(dict(zip(cols, r)), default=str))
    else:
        print(format_table(cols, rows))
    return 0


def _report(args: argparse.Namespace) -> int:
    from vlp_core.report import write_report

    out = write_report(_catalog_file(args), args.out, versions=args.versions, n_samples=args.samples)
    print(f"report: {out}")
    return 0


def _record(args: argparse.Namespace) -> int:
    from vlp_core.catalog import record_version, version_name
    from vlp_core.cli import load_params_from_args
    from vlp_core.io import write_json

    params = load_params_from_args(args)
    s = record_version(params, version_name(args.name), args.corpus, args.stats, args.metrics, repo_dir=args.repo,
                       round=args.round, catalog=args.catalog, state=args.state, reason=args.reason)
    if args.marker:
        write_json({"name": s.name, "corpus_rows": s.corpus_rows, "stats": s.stats, "metrics": s.metrics},
                   args.marker)
    print(f"recorded {s.name}: {s.corpus_rows} corpus rows, {s.stats} stats, {s.metrics} metrics, "
          f"git {s.git_rev or '-'}")
    return 0
