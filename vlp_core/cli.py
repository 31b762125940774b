"""The core of the ``vlp`` command line: one sub-command per stage, all reading ``params.yaml``.

Each package registers its own sub-commands in a ``commands.py`` module with a
``register(subparsers)`` function (listed in ``COMMAND_MODULES``); this file only wires
them up, applies the offline environment, and turns user errors into one clear line.  The
``vlp`` program itself is :mod:`flows.cli`, which adds the Prefect faces (``run``, ``cycles``,
``deploy``, ``demo``) above this: nothing in ``vlp_core`` imports ``flows``.  Registering
imports nothing heavy; torch and friends load when a command runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from vlp_core.config import load_params
from vlp_core.env import apply_offline_env
from vlp_core.errors import VlpError

# Each module exposes register(subparsers).  Keep the list sorted by pipeline order.
COMMAND_MODULES = [
    "vlp_core.synthetic.commands",  # vlp synthetic make|serve|urls
    "vlp_core.ingest.commands",  # vlp ingest
    "vlp_core.models.commands",  # vlp export, vlp import
    "vlp_core.train.commands",  # vlp pretrain|finetune|evaluate
    "vlp_core.capfilt.commands",  # vlp capfilt [rethreshold]
    "vlp_core.features.commands",  # vlp features
    "vlp_core.catalog_commands",  # vlp versions|query|report|record
]


def add_params_args(parser: argparse.ArgumentParser) -> None:
    """``--params FILE`` and repeatable ``-S section.key=value`` (DVC's override form)."""
    parser.add_argument("--params", default="params.yaml", help="settings file (default: params.yaml)")
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a setting, e.g. -S ingest.thread_count=32 (repeatable)",
    )


def load_params_from_args(args: argparse.Namespace):
    return load_params(args.params, args.overrides)


def build_parser(modules: Sequence[str] = tuple(COMMAND_MODULES)) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlp",
        description="Bootstrap vision-language pretraining data with BLIP's CapFilt.",
    )
    parser.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None, modules: Sequence[str] = tuple(COMMAND_MODULES)) -> int:
    apply_offline_env()
    parser = build_parser(modules)
    args = parser.parse_args(argv)
    show_tb = args.traceback or os.environ.get("VLP_TRACEBACK") == "1"
    try:
        rc = args.func(args)
    except VlpError as exc:
        if show_tb:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
