"""The network guard at connect time (every hop, every address) and the pixel limit before
decoding, inside img2dataset's real download processes, against real servers on 127.0.0.1."""
from __future__ import annotations

import io
import socket
import struct
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_world import tiny_params
from vlp_core.ingest import netguard as G
from vlp_core.ingest.stage import run_ingest
from vlp_core.ingest.workers import image_header_size


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height (its data is a few zero rows)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    raw = zlib.compress(b"\x00" * (width + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b"")


class _Server:
    """A loopback server with fixed routes: path -> (status, headers, body); logs every request."""

    def __init__(self, routes):
        self.routes, self.log = routes, []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                owner.log.append(self.path)
                status, headers, body = owner.routes(self.path) if callable(owner.routes) else \
                    owner.routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.host_port = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.base = f"http://{self.host_port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def two_servers():
    second = _Server({"/ok.jpg": (200, {"Content-Type": "image/jpeg"}, _jpeg())})
    first = _Server({
        "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, _jpeg()),
        "/hop.jpg": (302, {"Location": f"{second.base}/ok.jpg"}, b""),
        "/bomb.png": (200, {"Content-Type": "image/png"}, _png_claiming(20000, 20000)),
    })
    yield first, second
    first.close()
    second.close()


def _ingest(tmp_path, urls, allowed, monkeypatch, **over):
    monkeypatch.delenv("VLP_ALLOWED_HOSTS", raising=False)
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    params = tiny_params(**{"ingest.allowed_hosts": tuple(allowed), "ingest.retries": 0, **over})
    stats = run_ingest(params, lst, tmp_path / "out")
    df = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas().sort_values("row_index")
    assert stats.rows_in == stats.rows_out == len(urls) == len(df)  # every row, once, with a status
    assert sum(stats.counts.values()) == len(urls)
    return stats, df


def test_redirect_to_a_host_not_allowed_is_refused_in_the_download_process(tmp_path, two_servers, monkeypatch):
    first, second = two_servers
    urls = [f"{first.base}/ok.jpg", f"{first.base}/hop.jpg", f"{second.base}/ok.jpg"]
    stats, df = _ingest(tmp_path, urls, [first.host_port], monkeypatch)
    assert df.status.tolist() == ["success", "failed_to_download", "refused_url"]
    assert "refused by the network guard" in df.reason.iloc[1] and second.host_port in df.reason.iloc[1]
    assert "loopback" in df.reason.iloc[1]
    assert "/hop.jpg" in first.log
    assert second.log == []  # the second server never saw a request


def test_failed_lookup_fails_closed(tmp_path, two_servers, monkeypatch):
    first, _ = two_servers
    port = first.host_port.rsplit(":", 1)[1]
    # "*.invalid" never resolves (RFC 2606): passed on by the early check, refused at connect time
    stats, df = _ingest(tmp_path, [f"http://no-such-host.invalid:{port}/ok.jpg"], [], monkeypatch)
    assert df.status.tolist() == ["failed_to_download"]
    assert "lookup of no-such-host.invalid failed" in df.reason.iloc[0]
    assert first.log == []


def test_pixel_limit_is_checked_before_decoding(tmp_path, two_servers, monkeypatch):
    first, _ = two_servers
    assert image_header_size(_png_claiming(20000, 20000)) == (20000, 20000)
    urls = [f"{first.base}/bomb.png", f"{first.base}/ok.jpg"]
    stats, df = _ingest(tmp_path, urls, [first.host_port], monkeypatch)
    assert df.status.tolist() == ["failed_to_resize", "success"]
    assert "20000 x 20000 = 400000000 pixels, over ingest.max_image_pixels=40000000" in df.reason.iloc[0]


def test_address_verdicts():
    refused = {"127.0.0.1": "loopback", "::1": "loopback", "10.1.2.3": "private", "192.168.0.1": "private",
               "169.254.169.254": "link-local", "100.64.0.1": "shared", "0.0.0.0": "unspecified",
               "224.0.0.1": "multicast", "198.18.0.1": "private", "::ffff:127.0.0.1": "embedding a loopback",
               "2002:7f00:1::1": "embedding a loopback", "2002:a00:1::1": "embedding a private",
               "64:ff9b::7f00:1": "embedding a loopback", "fe80::1": "link-local", "fc00::1": "private",
               "240.0.0.1": "private", "2001:db8::1": "private"}
    for addr, kind in refused.items():
        assert kind in (G.address_verdict(addr) or "allowed"), addr
    for addr in ("93.184.216.34", "2606:4700::1111", "2002:5db8:d822::1", "64:ff9b::5db8:d822"):
        assert G.address_verdict(addr) is None, addr
    assert G.normalise_host("LocalHost.") == "localhost" and G.normalise_host("[::1]") == "::1"
    assert G.parse_allowed(["127.0.0.1:8765", "[::1]:80"]) == {("127.0.0.1", 8765), ("::1", 80)}
    with pytest.raises(ValueError, match="host:port"):
        G.parse_allowed(["127.0.0.1"])


def test_a_name_is_resolved_once_and_every_address_checked():
    """DNS rebinding: the guard resolves once, refuses when any address is private, and connects
    to the address it checked (never resolving the name a second time)."""
    calls = []

    def rebinding(host, port, family=0, type_=0):
        calls.append(host)
        addr = "93.184.216.34" if len(calls) == 1 else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, port))]

    reason, infos = G.host_verdict("images.example", 80, frozenset(), resolver=rebinding)
    assert reason is None and infos[0][4] == ("93.184.216.34", 80) and calls == ["images.example"]
    mixed = lambda *a: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),  # noqa: E731
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 80))]
    reason, _ = G.host_verdict("images.example", 80, frozenset(), resolver=mixed)
    assert "resolves to loopback address 127.0.0.1" in reason
    loop = lambda *a: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 8765))]  # noqa: E731
    assert G.host_verdict("127.0.0.1", 8765, frozenset({("127.0.0.1", 8765)}), resolver=loop)[0] is None
    assert "not in ingest.allowed_hosts" in G.host_verdict("127.0.0.1", 8766, frozenset(), resolver=loop)[0]


def test_guarded_create_connection_in_this_process(two_servers):
    first, second = two_servers
    host, port = first.host_port.split(":")
    try:
        G.install({(host, int(port))})
        socket.create_connection((host, int(port)), timeout=5).close()
        with pytest.raises(G.GuardRefused, match="refused by the network guard"):
            socket.create_connection(("127.0.0.1", int(second.host_port.split(":")[1])), timeout=5)
    finally:
        G.uninstall()
    assert socket.create_connection is G._original_create_connection


def test_the_policy_belongs_to_the_calling_thread():
    """Concurrent ingests (a thread-pool task runner) each get their own policy; a download
    outside guarded_download gets img2dataset's own resizer."""
    import importlib

    from img2dataset.resizer import Resizer

    from vlp_core.ingest.workers import GuardedResizer, guarded_download

    main = importlib.import_module("img2dataset.main")
    made, ready = {}, threading.Barrier(2)

    def ingest(name, allowed):
        with guarded_download({allowed}, 1000):
            ready.wait(timeout=10)  # both policies are open at once
            made[name] = main.Resizer(image_size=32, resize_mode="border", resize_only_if_bigger=False)

    threads = [threading.Thread(target=ingest, args=(n, (n, 1))) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {n: (type(r), r.vlp_allowed_hosts) for n, r in made.items()} == {
        "a": (GuardedResizer, frozenset({("a", 1)})), "b": (GuardedResizer, frozenset({("b", 1)}))}
    assert type(main.Resizer(image_size=32, resize_mode="border", resize_only_if_bigger=False)) is Resizer
