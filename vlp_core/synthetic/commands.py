"""`vlp synthetic make|serve|urls` (registered by vlp_core.cli)."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    """Add this package's sub-commands.  Heavy imports go inside the handlers."""
    from vlp_core.cli import add_params_args

    p = subparsers.add_parser("synthetic", help="the synthetic web: make, serve, write URL lists")
    sub = p.add_subparsers(dest="synthetic_command", metavar="ACTION")
    sub.required = True

    make = sub.add_parser("make", help="generate a seeded world (images, URL lists, ground truth)")
    make.add_argument("--out", required=True, help="world directory W")
    make.add_argument("--force", action="store_true", help="regenerate even if W matches the settings")
    add_params_args(make)
    make.set_defaults(func=_make)

    serve = sub.add_parser("serve", help="serve W on 127.0.0.1 until Ctrl-C; writes W/urls/<split>.parquet")
    serve.add_argument("--world", required=True, help="world directory W")
    serve.add_argument("--port", type=int, default=0, help="port (0 = any free port)")
    serve.set_defaults(func=_serve)

    urls = sub.add_parser("urls", help="write absolute URL lists W/urls/<split>.parquet for a base URL")
    urls.add_argument("--world", required=True, help="world directory W")
    urls.add_argument("--base", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    urls.set_defaults(func=_urls)


def _make(args: argparse.Namespace) -> int:
    from vlp_core.cli import load_params_from_args
    from vlp_core.synthetic.make import run_synthetic_make

    params = load_params_from_args(args)
    stats = run_synthetic_make(params, args.out, force=args.force)
    state = "unchanged (same settings)" if stats.shards_skipped else f"made in {stats.seconds:.1f} s"
    print(f"world {args.out}: {stats.rows_out} rows, {state}")
    for key in sorted(stats.counts):
        print(f"  {key:<28} {stats.counts[key]:>7}")
    return 0


def _stop_on_sigterm() -> None:
    """Make SIGTERM (e.g. from a Makefile or a process manager) stop the server like Ctrl-C."""
    import signal

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def _serve(args: argparse.Namespace) -> int:
    import time

    from vlp_core.synthetic.server import serve_world, write_url_lists

    with serve_world(args.world, port=args.port) as srv:
        paths = write_url_lists(args.world, srv.base_url)
        print(f"serving {srv.base_url}", flush=True)
        for split, path in paths.items():
            print(f"  {split}: {path}", flush=True)
        _stop_on_sigterm()
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopped", flush=True)
    return 0


def _urls(args: argparse.Namespace) -> int:
    from vlp_core.synthetic.server import write_url_lists

    for split, path in write_url_lists(args.world, args.base).items():
        print(f"{split}: {path}")
    return 0
