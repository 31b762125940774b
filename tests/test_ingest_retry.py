"""`vlp ingest --retry-failed`: only transient failures are downloaded again, into new shards,
against a real loopback server that fails some paths on the first request only."""
from __future__ import annotations

import hashlib
import io
import socket
import struct
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures_world import tiny_params
from vlp_core.config import ConfigError
from vlp_core.ingest import netguard as G
from vlp_core.ingest.retry import NO_RESULT, is_transient, transient_rows
from vlp_core.ingest.stage import IngestError, run_ingest
from vlp_core.io import read_json
from vlp_core.schema import INGEST_STATUSES
from vlp_core.shards import ShardReader

TIMEOUT = 1  # ingest.timeout; the slow path waits longer than this on its first request


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 40 + seed * 10 % 200, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


class FlakyServer:
    """A loopback server whose first path segment says how it answers; every GET is logged.

    ``/ok/...`` an image; ``/once503/``, ``/onceclose/`` (connection closed, no answer),
    ``/oncereset/`` (TCP reset), ``/onceslow/`` (answers after the client's timeout): fail on the
    first request for that path, then serve the image; ``/always503/`` 503 every time;
    ``/missing/`` 404; ``/notimage/`` HTML; ``/optout/`` an image with ``X-Robots-Tag: noai``;
    ``/toprivate/`` a redirect to a private address (refused by the network guard)."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self._seen: Counter[str] = Counter()
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                with owner._lock:
                    owner.log.append(self.path)
                    owner._seen[self.path] += 1
                    first = owner._seen[self.path] == 1
                kind = self.path.split("/")[1]
                body = _jpeg(len(self.path))
                if kind in ("once503", "always503") and (first or kind == "always503"):
                    return self._send(503, b"busy", "text/plain")
                if kind == "onceclose" and first:
                    self.close_connection = True
                    return
                if kind == "oncereset" and first:
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                if kind == "onceslow" and first:
                    time.sleep(TIMEOUT + 1.5)
                if kind == "missing":
                    return self._send(404, b"no", "text/plain")
                if kind == "notimage":
                    return self._send(200, b"<html>not an image</html>", "text/html")
                if kind == "toprivate":
                    return self._send(302, b"", "text/plain", {"Location": "http://10.255.255.1/x.jpg"})
                extra = {"X-Robots-Tag": "noai"} if kind == "optout" else {}
                self._send(200, body, "image/jpeg", extra)

            def _send(self, status, body, ctype, headers=None):
                self.send_response(status)
                for k, v in {"Content-Type": ctype, "Content-Length": str(len(body)), **(headers or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def handle_one_request(self):  # the client may be gone (timeout, reset): not an error here
                try:
                    super().handle_one_request()
                except (OSError, ValueError):
                    self.close_connection = True

            def finish(self):
                try:
                    super().finish()
                except (OSError, ValueError):
                    pass

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.host_port = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.base = f"http://{self.host_port}"

    def requests(self) -> list[str]:
        with self._lock:
            return list(self.log)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def flaky():
    srv = FlakyServer()
    yield srv
    srv.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --------------------------------------------------------------------------- the rule
def _reason_of(url: str, directives=None) -> str:
    """The error_message img2dataset records for ``url`` (its own download function)."""
    from img2dataset.downloader import download_image

    _, stream, err = download_image((0, url), TIMEOUT, None, directives)
    assert stream is None and err, url
    return err


def test_is_transient_on_the_reasons_img2dataset_records(flaky, tmp_path):
    b, port = flaky.base, _closed_port()
    transient = {
        "503": _reason_of(f"{b}/always503/a.jpg"),
        "closed": _reason_of(f"{b}/onceclose/a.jpg"),
        "reset": _reason_of(f"{b}/oncereset/a.jpg"),
        "timeout": _reason_of(f"{b}/onceslow/a.jpg"),
        "refused": _reason_of(f"http://127.0.0.1:{port}/a.jpg"),
        "no result": f"{NO_RESULT} (its shard failed; rerun to retry)",
    }
    permanent = {
        "404": _reason_of(f"{b}/missing/a.jpg"),
        "opt-out": _reason_of(f"{b}/optout/a.jpg", ["noai"]),
        "bad port": _reason_of("http://127.0.0.1:8a/a.jpg"),
        "bad path": _reason_of(f"{b}/a b.jpg"),
    }
    G.install({("127.0.0.1", flaky.httpd.server_address[1])})
    try:  # the guard of the download processes, here in-process: a redirect to a private address
        permanent["guard"] = _reason_of(f"{b}/toprivate/a.jpg")
    finally:
        G.uninstall()
    # a failed lookup, as the guard refuses it (recorded in a real run; no DNS query here)
    permanent["lookup"] = ("<urlopen error refused by the network guard: lookup of no-such-host.invalid failed "
                           "([Errno -2] Name or service not known); refused>")
    # what the reasons look like (urllib's, through img2dataset's str(err))
    assert transient["503"] == "HTTP Error 503: Service Unavailable"
    assert "Remote end closed connection" in transient["closed"]
    assert "Connection reset" in transient["reset"] and "timed out" in transient["timeout"]
    assert "Connection refused" in transient["refused"]
    assert permanent["404"].startswith("HTTP Error 404") and "X-Robots-Tag" in permanent["opt-out"]
    assert "refused by the network guard" in permanent["guard"] and "private" in permanent["guard"]
    assert "nonnumeric port" in permanent["bad port"] and "control characters" in permanent["bad path"]
    for name, reason in transient.items():
        assert is_transient("failed_to_download", reason), (name, reason)
    for name, reason in permanent.items():
        assert not is_transient("failed_to_download", reason), (name, reason)
    # other HTTP codes, and the statuses that are never downloads that failed
    assert is_transient("failed_to_download", "HTTP Error 502: Bad Gateway")
    assert not is_transient("failed_to_download", "HTTP Error 429: Too Many Requests")
    assert not is_transient("failed_to_download", "HTTP Error 410: Gone")
    assert not is_transient("failed_to_download", "something nobody has seen before")
    assert not is_transient("failed_to_download", None)
    for status in INGEST_STATUSES:
        if status != "failed_to_download":
            assert not is_transient(status, transient["timeout"]), status
    assert not is_transient("failed_to_resize", "image header unreadable (not decoded)")
    assert transient_rows(["success", "failed_to_download", "failed_to_download", "refused_url"],
                          [None, transient["503"], permanent["404"], "host 10.0.0.7 is a private address"]) == [1]


# --------------------------------------------------------------------------- the stage
TRANSIENT_PATHS = ["/once503/a.jpg", "/onceclose/b.jpg", "/oncereset/c.jpg", "/onceslow/d.jpg", "/always503/e.jpg"]
RECOVERED = TRANSIENT_PATHS[:4]
PERMANENT_PATHS = ["/missing/f.jpg", "/notimage/g.html", "/optout/h.jpg", "/toprivate/i.jpg"]


def _rows(base: str, refused_port: int) -> list[tuple]:
    ok = [f"{base}/ok/{i}.jpg" for i in range(4)]
    return [
        (ok[0], "first"),
        (base + TRANSIENT_PATHS[0], "503 once"),
        (base + PERMANENT_PATHS[0], "404"),
        (ok[1], "second"),
        (base + TRANSIENT_PATHS[1], "closed once"),
        (base + PERMANENT_PATHS[1], "not an image"),
        (f"http://127.0.0.1:{refused_port}/j.jpg", "nothing listens"),  # transient: retried, refused again
        (base + TRANSIENT_PATHS[2], "reset once"),
        ("http://10.0.0.7/k.jpg", "refused address"),  # refused by validation: never requested
        (base + PERMANENT_PATHS[2], "opted out"),
        (ok[2], "third"),
        (base + TRANSIENT_PATHS[3], "slow once"),
        (ok[0], "duplicate"),
        (base + PERMANENT_PATHS[3], "redirect to a private address"),
        ("notaurl", "invalid"),
        (base + TRANSIENT_PATHS[4], "503 always"),
        (ok[3], "fourth"),
    ]


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _check_counts(out: Path, n: int) -> dict:
    stats = read_json(out / "stats.json")
    man = pq.read_table(out / "manifest.parquet").to_pandas()
    assert stats["rows_in"] == stats["rows_out"] == len(man) == n
    assert sum(stats["counts"].values()) == n
    assert stats["counts"] == {k: v for k, v in Counter(man.status).items()}
    assert list(man.row_index) == list(range(n))
    return stats


def test_retry_failed_recovers_exactly_the_transient_rows(flaky, tmp_path, monkeypatch, capsys):
    from vlp_core.cli import main

    monkeypatch.delenv("VLP_ALLOWED_HOSTS", raising=False)
    refused_port = _closed_port()
    rows = _rows(flaky.base, refused_port)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), urls)
    over = {"ingest.allowed_hosts": (flaky.host_port, f"127.0.0.1:{refused_port}"), "ingest.timeout": TIMEOUT,
            "ingest.number_sample_per_shard": 4, "ingest.retries": 0}
    out = tmp_path / "out"

    # 1. the first run: 14 rows downloaded in 4 shards, with failures of every kind
    run_ingest(tiny_params(**over), urls, out)
    first = pq.read_table(out / "manifest.parquet").to_pandas()
    _check_counts(out, len(rows))
    by_path = {u.split(flaky.host_port, 1)[-1]: i for i, u in enumerate(first.url)}
    for p in TRANSIENT_PATHS:
        assert first.status[by_path[p]] == "failed_to_download", (p, first.reason[by_path[p]])
    assert first.status[6] == "failed_to_download" and "Connection refused" in first.reason[6]
    assert [first.status[by_path[p]] for p in PERMANENT_PATHS] == [
        "failed_to_download", "failed_to_resize", "failed_to_download", "failed_to_download"]
    assert list(first.status[[8, 12, 14]]) == ["refused_url", "duplicate_url", "refused_url"]
    shards = out / "shards"
    old = _digests(shards)
    assert sorted(p for p in old if p.endswith("_stats.json")) == [f"0000{i}_stats.json" for i in range(4)]
    fingerprint = (out / "_work" / "fingerprint.json").read_bytes()
    seen = len(flaky.requests())

    # 2. --retry-failed: only the transient rows are requested again, into new shards
    stats = run_ingest(tiny_params(**over, **{"ingest.retry_failed": True}), urls, out)
    again = flaky.requests()[seen:]
    assert Counter(again) == Counter(TRANSIENT_PATHS), again  # nothing permanent, nothing twice
    assert (out / "_work" / "fingerprint.json").read_bytes() == fingerprint
    after = pq.read_table(out / "manifest.parquet").to_pandas()
    st = _check_counts(out, len(rows))
    assert st["extra"]["retry"] == {"retried": 6, "transient": 6, "recovered": 4, "still_failed": 2,
                                    "shards": ["00004", "00005"]}
    assert stats.counts["success"] == st["counts"]["success"] == Counter(first.status)["success"] + 4
    new = _digests(shards)
    assert {k: new[k] for k in old} == old  # the earlier shards, byte for byte
    assert sorted(set(new) - set(old)) == sorted(f"0000{i}{ext}" for i in (4, 5)
                                                 for ext in (".tar", ".parquet", "_stats.json"))
    assert list(after.url) == list(first.url) and list(after.caption) == list(first.caption)
    reader = ShardReader()
    for i in range(len(rows)):
        if first.url[i].split(flaky.host_port, 1)[-1] in RECOVERED:
            assert after.status[i] == "success" and after.reason[i] is None, after.reason[i]
            assert Path(after.shard[i]).name in ("00004.tar", "00005.tar")
            arr, why = reader.read(after.shard[i], after.key[i])
            assert why is None and arr.shape == (48, 48, 3)
        elif i in (6, by_path["/always503/e.jpg"]):  # retried, failed again (the same reason)
            assert after.status[i] == "failed_to_download" and after.reason[i] == first.reason[i]
        else:  # untouched: successes keep their shard reference, permanent failures their reason
            assert after.iloc[i].equals(first.iloc[i]), (i, after.iloc[i], first.iloc[i])
    assert after.key.dropna().is_unique

    # 3. a plain rerun: no request, no new shard, the same manifest (the retry stays merged)
    seen = len(flaky.requests())
    run_ingest(tiny_params(**over), urls, out)
    assert flaky.requests()[seen:] == [] and _digests(shards) == new
    assert pq.read_table(out / "manifest.parquet").to_pandas().equals(after)

    # 4. `vlp ingest --retry-failed` again: only the two rows still failing transiently
    args = ["ingest", "--urls", str(urls), "--out", str(out), "--retry-failed",
            "-S", f"ingest.allowed_hosts=[{flaky.host_port}, 127.0.0.1:{refused_port}]",
            "-S", "ingest.processes_count=1", "-S", "ingest.thread_count=8"]
    for k, v in over.items():
        if k != "ingest.allowed_hosts":
            args += ["-S", f"{k}={v}"]
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert flaky.requests()[seen:] == ["/always503/e.jpg"]
    assert "retry: 2 transient failures downloaded again, 0 recovered, 2 still failing (new shards 00006)" in printed
    assert f"{'total':<20} {len(rows):>8} (rows in {len(rows)})" in printed
    st = _check_counts(out, len(rows))
    assert st["counts"] == dict(Counter(after.status))
    assert {k: v for k, v in _digests(shards).items() if k in new} == new

    # 5. the resume guard still refuses another URL list, retry or not
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows[:5]], "caption": [r[1] for r in rows[:5]]}), other)
    with pytest.raises(IngestError, match="different URL list"):
        run_ingest(tiny_params(**over, **{"ingest.retry_failed": True}), other, out)


def test_retry_needs_incremental(tmp_path, capsys):
    from vlp_core.cli import main

    with pytest.raises(ConfigError, match="ingest.retry_failed: needs ingest.incremental=true"):
        tiny_params(**{"ingest.retry_failed": True, "ingest.incremental": False})
    (tmp_path / "u.txt").write_text("http://127.0.0.1:1/a.jpg\n")
    rc = main(["ingest", "--urls", str(tmp_path / "u.txt"), "--out", str(tmp_path / "o"), "--retry-failed",
               "-S", "ingest.incremental=false"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: --retry-failed: ingest.incremental: must be true") and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_flow_ingest_task_honours_retry_failed(flaky, tmp_path, monkeypatch):
    """The flows' ingest step reads ``ingest.retry_failed``; turning it on reruns the cached
    stage (the setting is part of its input key), which then retries the transient rows."""
    from flows import tasks as T
    from vlp_core.rounds import ingest_step

    def ingest(p):
        return T.unwrap(T.stage_task.fn(p, layout, ingest_step(p, layout, "web"), []))

    monkeypatch.delenv("VLP_ALLOWED_HOSTS", raising=False)
    layout = T.Layout(tmp_path)
    urls = layout.urls("web")
    urls.parent.mkdir(parents=True)
    paths = ["/ok/1.jpg", "/once503/x.jpg", "/missing/y.jpg"]
    pq.write_table(pa.table({"url": [flaky.base + p for p in paths], "caption": ["a", "b", "c"]}), urls)
    params = tiny_params(**{"ingest.allowed_hosts": (flaky.host_port,), "ingest.timeout": TIMEOUT})
    first = ingest(params)
    assert not first["skipped"] and first["stats"]["counts"] == {"success": 1, "failed_to_download": 2}
    assert ingest(params)["skipped"]
    seen = len(flaky.requests())
    retry = params.replace(**{"ingest.retry_failed": True})
    res = ingest(retry)
    assert not res["skipped"] and res["key"] != first["key"]
    assert flaky.requests()[seen:] == ["/once503/x.jpg"]
    assert res["stats"]["counts"] == {"success": 2, "failed_to_download": 1}
    assert res["stats"]["extra"]["retry"]["recovered"] == 1
    assert ingest(retry)["skipped"]  # done once: the cache holds it


def test_no_retry_while_a_shard_of_the_list_is_unfinished(tmp_path, monkeypatch):
    """A retry shard takes the number after the highest finished shard, so while a shard of the
    list itself has no done marker (its download failed) the retry pass waits: nothing is
    downloaded into new shards and the summary says why.  (img2dataset is replaced by a recorder.)"""
    from vlp_core.ingest import stage

    calls: list[str] = []
    monkeypatch.setattr(stage, "_run_img2dataset", lambda url_list, shards, ip, mode="incremental": calls.append(mode))
    urls = tmp_path / "u.txt"
    urls.write_text("".join(f"http://127.0.0.1:1/{c}.jpg\n" for c in "abc"))
    shards = tmp_path / "out" / "shards"
    shards.mkdir(parents=True)
    cols = ["row_index", "key", "status", "error_message", "width", "height", "sha256"]
    pq.write_table(pa.table(dict(zip(cols, [[0, 1], ["000000000", "000000001"], ["success", "failed_to_download"],
                                            [None, "HTTP Error 503: Service Unavailable"], [48, None], [48, None],
                                            ["0" * 64, None]]))), shards / "00000.parquet")
    (shards / "00000_stats.json").write_text("{}")
    pq.write_table(pa.table(dict(zip(cols, [[2], ["000010000"], ["success"], [None], [48], [48], ["1" * 64]]))),
                   shards / "00001.parquet")  # no done marker: unfinished
    params = tiny_params(**{"ingest.allowed_hosts": ("127.0.0.1:1",), "ingest.number_sample_per_shard": 2,
                            "ingest.retry_failed": True})
    stats = run_ingest(params, urls, tmp_path / "out")
    assert calls == ["incremental"]  # the list's unfinished shard was tried; no "extend" pass
    man = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert list(man.status) == ["success", "failed_to_download", "failed_to_download"]
    assert man.reason[2].startswith(NO_RESULT) and man.shard[0].endswith("00000.tar")
    retry = stats.extra["retry"]
    assert retry["retried"] == retry["recovered"] == retry["still_failed"] == 0 and retry["transient"] == 2
    assert "shards 00001 of the URL list did not finish" in retry["skipped"]
    assert stats.shards_failed == ["00001"] and stats.rows_in == stats.rows_out == 3
    assert "retry: 2 transient failures not retried: shards 00001" in stage.summary_table(stats)
