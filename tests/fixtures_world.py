"""Fixtures for the synthetic world: generated, served on 127.0.0.1 and ingested.

* ``tiny_world``: a world directory (300 web, 100 human, 100 test rows), made once per session.
* ``world_server``: that world served on 127.0.0.1 (``.base_url``, ``.request_log``).
* ``tiny_ingest``: the three splits ingested once per session with img2dataset; a dict with
  ``world``, ``base_url``, ``params`` and, per split, ``<split>_manifest`` / ``<split>_dir``
  (plus ``<split>_urls``, the absolute URL list that was ingested).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest

from vlp_core.config import Params

TINY_SIZES = {"synthetic.n_web": 300, "synthetic.n_human": 100, "synthetic.n_test": 100}
# img2dataset settings that keep a test run cheap on 2 cores: one process, small shards.
TINY_INGEST = {
    "ingest.processes_count": 1,
    "ingest.thread_count": 8,
    "ingest.number_sample_per_shard": 100,
    "ingest.timeout": 5,
}


def tiny_params(**overrides: Any) -> Params:
    """Defaults with the tiny world and cheap ingest settings, plus ``overrides`` (dotted keys)."""
    return Params().replace(**{**TINY_SIZES, **TINY_INGEST, **overrides})


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    from vlp_core.synthetic.make import run_synthetic_make

    world = tmp_path_factory.mktemp("world")
    run_synthetic_make(tiny_params(), world)
    return world


@pytest.fixture(scope="session")
def world_server(tiny_world) -> Iterator[Any]:
    """The tiny world on 127.0.0.1; while it runs, ``VLP_ALLOWED_HOSTS`` lets downloads (and the
    subprocesses of the flow and deployment tests) reach it and nothing else on loopback."""
    import os

    from vlp_core.synthetic.server import serve_world

    with serve_world(tiny_world) as srv:
        before = os.environ.get("VLP_ALLOWED_HOSTS")
        os.environ["VLP_ALLOWED_HOSTS"] = srv.host_port
        try:
            yield srv
        finally:
            if before is None:
                os.environ.pop("VLP_ALLOWED_HOSTS", None)
            else:
                os.environ["VLP_ALLOWED_HOSTS"] = before


@pytest.fixture(scope="session")
def tiny_ingest(tiny_world, world_server, tmp_path_factory) -> dict[str, Any]:
    from vlp_core.ingest.stage import run_ingest
    from vlp_core.synthetic.server import write_url_list

    root = tmp_path_factory.mktemp("ingest")
    params = tiny_params()
    out: dict[str, Any] = {"world": tiny_world, "base_url": world_server.base_url, "params": params}
    for split in ("web", "human", "test"):
        urls = write_url_list(tiny_world, split, world_server.base_url, root / f"{split}_urls.parquet")
        run_ingest(params, urls, root / split)
        out[f"{split}_urls"] = urls
        out[f"{split}_dir"] = root / split
        out[f"{split}_manifest"] = root / split / "manifest.parquet"
    return out


def log_in_child(message: str) -> int:
    """Logs ``message`` on a project logger (run in a spawned child by the log-relay test)."""
    import logging

    logging.getLogger("vlp_core.train.loop").info("%s", message)
    return 7
