"""Serve a synthetic world over HTTP on 127.0.0.1, and write absolute URL lists for it.

``serve_world(W)`` starts a real ``ThreadingHTTPServer`` in a background thread; use it as a
context manager or call ``.start()`` / ``.stop()``.  Every requested path is appended to
``.request_log`` (thread-safe), which tests use to prove that no request was made.
A ``?robots=<directives>`` query makes the answer carry ``X-Robots-Tag: <directives>``.
"""
from __future__ import annotations

import functools
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.errors import VlpError
from vlp_core.io import write_parquet
from vlp_core.schema import C


class _Handler(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".jpg": "image/jpeg"}

    def __init__(self, *args, server_ref: "WorldServer", **kwargs):
        self._ref = server_ref
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (http.server API)
        self._ref._record(self.path)
        if self._ref.delay:
            time.sleep(self._ref.delay)
        super().do_GET()

    def do_HEAD(self) -> None:  # noqa: N802
        self._ref._record(self.path)
        super().do_HEAD()

    def end_headers(self) -> None:
        # ``?robots=noai`` asks for an opt-out header, to test that ingest honours it
        query = self.path.partition("?")[2]
        for part in query.split("&"):
            if part.startswith("robots="):
                self.send_header("X-Robots-Tag", part.split("=", 1)[1].replace("+", " "))
        super().end_headers()

    def log_message(self, format: str, *args) -> None:  # quiet: the request log is kept in memory
        return


class WorldServer:
    """A loopback HTTP server for ``W/www``.  ``base_url`` is ``http://127.0.0.1:PORT``."""

    def __init__(self, world_dir: str | Path, port: int = 0, delay: float = 0.0):
        self.root = Path(world_dir) / "www"
        if not self.root.is_dir():
            raise VlpError(f"{world_dir}: not a synthetic world (no www/ folder); run `vlp synthetic make` first")
        self.port = port
        self.delay = delay  # seconds to wait before answering each GET (tests of interrupted runs)
        self.request_log: list[str] = []
        self._lock = threading.Lock()
        self._httpd: Optional[ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    def _record(self, path: str) -> None:
        with self._lock:
            self.request_log.append(path)

    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def host_port(self) -> str:
        """``127.0.0.1:PORT``: the ``ingest.allowed_hosts`` entry that lets downloads reach it."""
        return self.base_url.split("//", 1)[1]

    def start(self) -> "WorldServer":
        handler = functools.partial(_Handler, directory=str(self.root), server_ref=self)
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="world-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def requests_for(self, prefix: str = "/") -> list[str]:
        with self._lock:
            return [p for p in self.request_log if p.startswith(prefix)]

    def __enter__(self) -> "WorldServer":
        return self.start() if self._httpd is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_world(world_dir: str | Path, port: int = 0, delay: float = 0.0) -> WorldServer:
    """A started server for ``world_dir`` (use ``with serve_world(W) as srv:`` or call ``.stop()``)."""
    return WorldServer(world_dir, port=port, delay=delay).start()


def write_url_list(world_dir: str | Path, split: str, base_url: str, out: str | Path | None = None) -> Path:
    """Write ``W/<split>.parquet`` with absolute URLs (columns ``url``, ``caption``, and
    ``regions`` where the split has box annotations) to ``out`` (default
    ``W/urls/<split>.parquet``) and return its path."""
    src = Path(world_dir) / f"{split}.parquet"
    if not src.exists():
        raise VlpError(f"{src}: no such URL list (splits: web, human, test)")
    table = pq.read_table(src)
    base = base_url.rstrip("/")
    urls = [base + p for p in table.column("url_path").to_pylist()]
    out = Path(out) if out is not None else Path(world_dir) / "urls" / f"{split}.parquet"
    cols = {C.URL: pa.array(urls, pa.string()), C.CAPTION: table.column(C.CAPTION)}
    if C.REGIONS in table.column_names:
        cols[C.REGIONS] = table.column(C.REGIONS)
    write_parquet(pa.table(cols), out)
    return out


def write_url_lists(world_dir: str | Path, base_url: str) -> dict[str, Path]:
    """All three splits: ``{split: W/urls/<split>.parquet}``."""
    return {s: write_url_list(world_dir, s, base_url) for s in ("web", "human", "test")}
