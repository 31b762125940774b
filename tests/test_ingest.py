"""Ingest against a real HTTP server on 127.0.0.1: counts, failure kinds, resume, refusals."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fixtures_world import tiny_params
from vlp_core.ingest.reader import InputFileError, read_url_list
from vlp_core.ingest.stage import IngestError, run_ingest
from vlp_core.ingest.validate import UrlValidator, normalise_caption
from vlp_core.schema import INGEST_STATUSES, manifest_schema
from vlp_core.shards import ShardReader
from vlp_core.synthetic.server import serve_world, write_url_list
from vlp_core.synthetic.truth import load_ground_truth, url_path

VLP = [sys.executable, "-m", "vlp_core.cli"]
REPO = Path(__file__).resolve().parents[1]


def _expected_status(fail_kind) -> str:
    return {None: "success", "404": "failed_to_download"}.get(fail_kind, "failed_to_resize")


def _check_against_truth(manifest_path: Path, world: Path, split: str) -> None:
    man = pq.read_table(manifest_path)
    assert man.schema.equals(manifest_schema(regions=split == "human"))  # the human split's boxes ride along
    df = man.to_pandas()
    gt = load_ground_truth(world).to_pandas()
    gt = gt[gt.split == split].set_index("url")
    assert len(df) == len(gt)
    assert list(df.row_index) == list(range(len(gt)))
    for row in df.itertuples():
        truth = gt.loc[url_path(row.url)]
        fail = truth.fail_kind if isinstance(truth.fail_kind, str) else None
        assert row.status == _expected_status(fail), (row.url, row.status, row.reason)
        assert row.caption == normalise_caption(truth.caption, 512)
        if row.status == "success":
            assert row.shard.endswith(".tar") and row.width == 48 and row.height == 48 and len(row.sha256) == 64
        else:
            assert row.reason and row.shard is None


def test_counts_invariant_and_truth(tiny_ingest):
    world = tiny_ingest["world"]
    for split, n in (("web", 300), ("human", 100), ("test", 100)):
        _check_against_truth(tiny_ingest[f"{split}_manifest"], world, split)
        stats = pq.read_table(tiny_ingest[f"{split}_manifest"]).num_rows
        assert stats == n
    df = pq.read_table(tiny_ingest["web_manifest"]).to_pandas()
    assert Counter(df.status) == {"success": 294, "failed_to_download": 2, "failed_to_resize": 4}
    # images read back through the (shard, key) reference are the served pixels, resized to 48
    ok = df[df.status == "success"].head(5)
    reader = ShardReader()
    for row in ok.itertuples():
        arr, reason = reader.read(row.shard, row.key)
        assert reason is None and arr.shape == (48, 48, 3)


def test_every_status_in_one_list(tiny_world, world_server, tmp_path):
    gt = load_ground_truth(tiny_world).to_pandas()
    web = gt[gt.split == "web"]
    base = world_server.base_url
    good = base + web[web.fail_kind.isna()].url.iloc[0]
    rows = [
        (good, "  a <b>big</b>&nbsp;red   circle &amp; more "),
        (good, "the same url again"),
        (base + web[web.fail_kind == "404"].url.iloc[0], "x"),
        (base + web[web.fail_kind == "not_image"].url.iloc[0], "x"),
        (base + web[web.fail_kind == "truncated"].url.iloc[0], "x"),
        ("ftp://127.0.0.1/web/000001.jpg", "x"),
        ("file:///etc/passwd", "x"),
        (None, "no url"),
        ("", "empty url"),
        ("http://", "no host"),
        (base + web[web.fail_kind.isna()].url.iloc[1], "x" * 2000),
        (good + "?robots=noai", "opted out"),
    ]
    urls = tmp_path / "list.parquet"
    pq.write_table(pa.table({"url": [r[0] for r in rows], "caption": [r[1] for r in rows]}), urls)
    stats = run_ingest(tiny_params(), urls, tmp_path / "out")
    df = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert stats.rows_in == stats.rows_out == len(df) == len(rows)
    assert list(df.status) == [
        "success", "duplicate_url", "failed_to_download", "failed_to_resize", "failed_to_resize",
        "refused_url", "refused_url", "invalid_row", "invalid_row", "invalid_row", "success",
        "failed_to_download",
    ]
    assert "X-Robots-Tag" in df.reason[11]  # img2dataset's opt-out header handling stays on
    assert set(stats.counts) <= set(INGEST_STATUSES) and sum(stats.counts.values()) == len(rows)
    assert df.caption[0] == "a big red circle & more"
    assert "row 0" in df.reason[1] and "404" in df.reason[2] and "scheme 'ftp'" in df.reason[5]
    assert len(df.caption[10]) <= 512 and df.caption[10].startswith("xxx")
    assert df.caption[7] == "no url"  # captions are kept even when the row is refused


def test_private_addresses_refused_without_any_request(tiny_world, world_server, tmp_path, monkeypatch):
    monkeypatch.delenv("VLP_ALLOWED_HOSTS")  # nothing allowed: the world's own server is refused too
    base = world_server.base_url
    port = base.rsplit(":", 1)[1]
    marker = "/web/000003.jpg?refused-test="
    urls = [
        f"{base}{marker}1",
        f"http://localhost:{port}{marker}2",
        f"http://[::1]:{port}{marker}3",
        f"http://10.0.0.7:{port}{marker}4",
        f"http://192.168.1.20{marker}5",
        f"http://169.254.169.254/latest/meta-data{marker}6",
        f"http://localhost.:{port}{marker}7",
        f"http://127.0.0.1.:{port}{marker}8",
        f"http://100.64.0.1{marker}9",
        f"http://[2002:7f00:1::1]:{port}{marker}10",
        f"http://[::ffff:127.0.0.1]:{port}{marker}11",
    ]
    lst = tmp_path / "urls.txt"
    lst.write_text("\n".join(urls) + "\n")
    before = len(world_server.request_log)
    stats = run_ingest(tiny_params(), lst, tmp_path / "out")
    df = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pandas()
    assert stats.counts == {"refused_url": len(urls)}
    assert all("not in ingest.allowed_hosts" in r for r in df.reason)
    assert "loopback" in df.reason[0] and "link-local" in df.reason[5] and "private" in df.reason[3]
    assert "loopback" in df.reason[6] and "loopback" in df.reason[7] and "shared" in df.reason[8]
    assert "embedding a loopback" in df.reason[9] and "embedding a loopback" in df.reason[10]
    time.sleep(0.2)
    assert not any("refused-test" in p for p in world_server.request_log[before:])
    assert world_server.requests_for(marker) == []


def test_hostname_resolving_to_private_is_refused():
    v = UrlValidator(resolver=lambda host: ["10.1.2.3"])
    status, reason = v.check("http://intranet.example/a.jpg")
    assert status == "refused_url" and "resolves to private address 10.1.2.3" in reason
    public = UrlValidator(resolver=lambda host: ["93.184.216.34"])
    assert public.check("https://images.example/a.jpg") == (None, None)
    # an allowed host:port, and only that one
    allowed = UrlValidator(allowed_hosts=frozenset({("127.0.0.1", 1)}))
    assert allowed.check("http://127.0.0.1:1/x") == (None, None)
    assert allowed.check("http://127.0.0.1:2/x")[0] == "refused_url"
    assert allowed.check("http://127.0.0.1/x")[0] == "refused_url"  # port 80


def test_normalise_caption():
    assert normalise_caption(" a\n\tred&nbsp;circle ", 512) == "a red circle"
    assert normalise_caption("<div class=x>&nbsp;</div>", 512) == ""
    assert normalise_caption("&amp;lt;b&amp;gt;bold", 512) == "bold"
    assert normalise_caption(None, 512) == ""
    assert normalise_caption("word " * 100, 23) == "word word word word"


def test_reader_formats_agree(tmp_path):
    urls = ["http://127.0.0.1:1/a.jpg", "http://127.0.0.1:1/b.jpg"]
    caps = ['a "quoted", comma caption', "plain"]
    pq.write_table(pa.table({"url": urls, "caption": caps}), tmp_path / "l.parquet")
    (tmp_path / "l.csv").write_text('url,caption\n"%s","a ""quoted"", comma caption"\n%s,plain\n' % (urls[0], urls[1]))
    (tmp_path / "l.tsv").write_text("url\tcaption\n%s\t%s\n%s\tplain\n" % (urls[0], caps[0], urls[1]))
    (tmp_path / "l.jsonl").write_text('{"url": "%s", "caption": "a \\"quoted\\", comma caption"}\n{"url": "%s", "caption": "plain"}\n' % tuple(urls))
    (tmp_path / "l.txt").write_text("\n".join(urls) + "\n")
    ip = tiny_params().ingest
    for ext in ("parquet", "csv", "tsv", "jsonl"):
        t = read_url_list(tmp_path / f"l.{ext}", ip)
        assert t.column("url").to_pylist() == urls and t.column("caption").to_pylist() == caps, ext
    t = read_url_list(tmp_path / "l.txt", ip)
    assert t.column("url").to_pylist() == urls and t.column("caption").null_count == 2
    # configurable columns
    pq.write_table(pa.table({"URL": urls, "TEXT": caps}), tmp_path / "m.parquet")
    ip2 = tiny_params(**{"ingest.url_col": "URL", "ingest.caption_col": "TEXT"}).ingest
    assert read_url_list(tmp_path / "m.parquet", ip2).column("caption").to_pylist() == caps


BAD_FILES = {
    "missing_url_column.csv": (b"link,caption\nhttp://127.0.0.1:1/a.jpg,x\n", "no url column 'url'"),
    "empty.csv": (b"", "empty file"),
    "binary.csv": (bytes(range(256)) * 8, "binary data"),
    "wrong_delimiter.csv": (b"url\tcaption\nhttp://127.0.0.1:1/a.jpg\tx\n", "tab-separated"),
    "binary.parquet": (b"\x00\x01garbage" * 50, "not a Parquet file"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_input_files_give_one_clear_line(tmp_path, name):
    content, needle = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputFileError):
        read_url_list(path, tiny_params().ingest)
    proc = subprocess.run(VLP + ["ingest", "--urls", str(path), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    err_lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1, proc.stderr
    assert err_lines[0].startswith("error: ") and str(path) in err_lines[0] and needle in err_lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "manifest.parquet").exists()


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "parquet"])
def test_nul_bytes_are_removed_from_captions_wherever_they_are(tmp_path, ext):
    """A NUL early in the file (inside the 64 KiB sniffed for binary data) or late: the file is
    read, and the captions lose their NULs."""
    from vlp_core.ingest.validate import validate_rows

    urls = [f"http://127.0.0.1:1/{i}.jpg" for i in range(3000)]
    caps = [f"caption {i}" for i in range(3000)]
    caps[0], caps[-1] = "a red\x00 cube", "late \x00nul\x00"
    path = tmp_path / f"l.{ext}"
    if ext == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": caps}), path)
    elif ext == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": c}) + "\n" for u, c in zip(urls, caps)))
    else:
        d = "," if ext == "csv" else "\t"
        path.write_text(f"url{d}caption\n" + "".join(f"{u}{d}{c}\n" for u, c in zip(urls, caps)))
    if ext in ("csv", "tsv"):  # raw NULs, one inside the sniffed head and one after it
        data = path.read_bytes()
        assert b"\x00" in data[:65536] and b"\x00" in data[65536:]
    t = read_url_list(path, tiny_params().ingest)
    assert t.num_rows == 3000
    v = validate_rows(t.column("url").to_pylist(), t.column("caption").to_pylist(), tiny_params().ingest)
    assert v.captions[0] == "a red cube" and v.captions[-1] == "late nul"
    assert not any("\x00" in c for c in v.captions)
    assert normalise_caption("x\x00y", 512) == "xy"


def test_a_mostly_nul_file_is_still_binary(tmp_path):
    path = tmp_path / "utf16.csv"
    path.write_bytes("url,caption\nhttp://127.0.0.1:1/a.jpg,x\n".encode("utf-16-le"))
    with pytest.raises(InputFileError, match="binary data"):
        read_url_list(path, tiny_params().ingest)


def test_resume_guard_refuses_other_list(tiny_ingest, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny_ingest["human_dir"], out)
    with pytest.raises(IngestError, match="different URL list"):
        run_ingest(tiny_ingest["params"], tiny_ingest["test_urls"], out)
    # starting over is explicit (and works around img2dataset's broken "overwrite" mode)
    params = tiny_params(**{"ingest.incremental": False})
    stats = run_ingest(params, tiny_ingest["test_urls"], out)
    assert stats.rows_out == 100 and stats.shards_skipped == 0
    _check_against_truth(out / "manifest.parquet", tiny_ingest["world"], "test")


@pytest.mark.slow
def test_killed_run_resumes_without_missing_or_duplicate_rows(tiny_world, tmp_path):
    """Kill `vlp ingest` (the whole process tree) after its first shard, rerun, check rows."""
    overrides = {"ingest.number_sample_per_shard": 25, "ingest.thread_count": 2, "ingest.processes_count": 1}
    out = tmp_path / "out"
    with serve_world(tiny_world, delay=0.03) as slow:
        urls = write_url_list(tiny_world, "web", slow.base_url, tmp_path / "web.parquet")
        args = VLP + ["ingest", "--urls", str(urls), "--out", str(out)]
        for k, v in {**overrides, "ingest.allowed_hosts": f"[{slow.host_port}]"}.items():
            args += ["-S", f"{k}={v}"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        shards = out / "shards"
        deadline = time.time() + 60
        while time.time() < deadline and not list(shards.glob("*_stats.json")):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        done_at_kill = len(list(shards.glob("*_stats.json")))
        assert 1 <= done_at_kill < 12, "the run must be killed midway"
        assert not (out / "manifest.parquet").exists()
        rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "total                     300 (rows in 300)" in rerun.stdout
    assert "resumed from an earlier run" in rerun.stdout
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_skipped"] >= done_at_kill and stats["shards_done"] + stats["shards_skipped"] == 12
    assert stats["rows_in"] == stats["rows_out"] == 300
    _check_against_truth(out / "manifest.parquet", tiny_world, "web")
    # every image is in exactly one shard, once
    members = Counter()
    for tar in sorted(shards.glob("*.tar")):
        with tarfile.open(tar) as tf:
            members.update(m.name for m in tf.getmembers() if m.name.endswith(".jpg"))
    df = pq.read_table(out / "manifest.parquet").to_pandas()
    assert sum(members.values()) == (df.status == "success").sum() == len(members)
    assert df.key.dropna().is_unique
