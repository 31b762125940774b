"""The README's worked examples run as written.

Every example block of README.md says in the HTML comment above it which test runs it, or why
none does (minutes of training, the official BLIP checkpoints, a GPU); see
``tests/readme_blocks.py``.  The blocks marked ``tested: tests/test_readme.py`` run here, each
command exactly as the README writes it, in a fresh work dir on the tiny synthetic world.  Every
``vlp`` command of the README, run here or not, must parse with the real ``vlp`` parser and its
``-S`` settings must load, so an example cannot name a flag or a setting that is gone.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from readme_blocks import REPO, NOTE_RE, all_commands, blocks, readme_command
from vlp_core.config import ConfigError, load_params, params_from_dict
from vlp_core.io import write_json, write_parquet
from vlp_core.schema import CORPUS_SCHEMA, conform

HERE = "tests/test_readme.py"
# the commands this file runs, by the README's own words (prefix -> the test that runs it)
RUN_HERE = {
    "vlp ingest --urls my_urls.parquet --out data/ingest/web -S ingest.url_col=URL": "test_ingest_your_own_url_list",
    "vlp ingest --urls my_urls.parquet --out data/ingest/web": "test_retry_only_the_failed_urls",
    "vlp versions list": "test_comparing_versions",
    "vlp versions diff": "test_comparing_versions",
    "vlp query": "test_comparing_versions",
    "vlp capfilt rethreshold": "test_comparing_versions",
    "vlp report": "test_comparing_versions",
}


def vlp_env(**extra: str) -> dict[str, str]:
    """The activated venv (its bin first on PATH) running this checkout's code."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(REPO)
    env.update(extra)
    return env


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=vlp_env(**env), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    return proc


# --------------------------------------------------------------------------- what the README promises
def test_every_example_block_says_whether_a_test_runs_it():
    for b in blocks():
        m = NOTE_RE.match(b.note)
        assert m, f"README.md:{b.line}: the {b.lang} block needs <!-- tested: ... --> or <!-- not run by the tests: ... -->"
        for t in b.tested_by:
            assert (REPO / t.split("::")[0]).is_file(), f"README.md:{b.line}: {t} does not exist"


def test_the_blocks_marked_for_this_file_are_run_here():
    import test_readme

    marked = [(b, c) for b, c in all_commands() if HERE in b.tested_by]
    assert marked
    for b, cmd in marked:
        text = " ".join(cmd)
        owner = next((t for p, t in RUN_HERE.items() if text.startswith(p)), None)
        assert owner and hasattr(test_readme, owner), f"README.md:{b.line}: {text!r} is marked tested but no test runs it"


def test_every_vlp_command_parses_and_its_settings_load():
    """Run or not, each ``vlp`` example parses with the real parser and its ``-S`` settings load
    over params.yaml (so do ``dvc exp run -S`` settings)."""
    from flows.cli import MODULES
    from vlp_core.cli import build_parser

    parser = build_parser(MODULES)
    seen = 0
    for b, cmd in all_commands():
        argv = [t for t in cmd if t != "&"]
        if argv[0] == "vlp":
            try:
                args = parser.parse_args(argv[1:])
            except SystemExit:
                pytest.fail(f"README.md:{b.line}: {' '.join(argv)!r} does not parse (see the usage above)")
            overrides = getattr(args, "overrides", [])
            seen += 1
        elif argv[:3] == ["dvc", "exp", "run"]:
            overrides = [argv[i + 1] for i, t in enumerate(argv) if t == "-S"]
        else:
            continue
        try:
            load_params(REPO / "params.yaml", overrides)
        except ConfigError as exc:
            pytest.fail(f"README.md:{b.line}: {' '.join(argv)!r}: {exc}")
    assert seen >= 20


def test_gpu_settings_load_over_params_yaml():
    (block,) = [b for b in blocks() if b.lang == "yaml" and "blip-base" in b.text]
    assert HERE in block.tested_by
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in yaml.safe_load(block.text).items():
        base[section] = {**base.get(section, {}), **values}
    p = params_from_dict(base, f"README.md:{block.line}")
    assert p.model.arch == "blip-base" and p.ingest.image_size == 384 and p.pretrain.lr == 3e-4


def test_help_names_every_command():
    proc = run(["vlp", "--help"], REPO)
    for name in ("ingest", "capfilt", "versions", "query", "report", "record", "cycles", "deploy", "demo"):
        assert f"    {name} " in proc.stdout


# --------------------------------------------------------------------------- ingest
def _url_list(world: Path, base_url: str, out: Path, n: int, url_col: str = "url", caption_col: str = "caption",
              dead_base: str | None = None) -> Path:
    """The first ``n`` web URLs of the world; with ``dead_base`` every second one on that server."""
    from vlp_core.synthetic.server import write_url_list

    t = pq.read_table(write_url_list(world, "web", base_url, out.parent / "all.parquet")).slice(0, n)
    urls = t.column("url").to_pylist()
    if dead_base:
        urls = [u.replace(base_url, dead_base) if i % 2 else u for i, u in enumerate(urls)]
    pq.write_table(pa.table({url_col: urls, caption_col: t.column("caption")}), out)
    return out


def test_ingest_your_own_url_list(tmp_path, tiny_world, world_server):
    cmd = readme_command("vlp ingest --urls my_urls.parquet --out data/ingest/web -S ingest.url_col=URL")
    _url_list(tiny_world, world_server.base_url, tmp_path / "my_urls.parquet", 24, "URL", "TEXT")
    out = run(cmd, tmp_path).stdout
    manifest = pq.read_table(tmp_path / "data" / "ingest" / "web" / "manifest.parquet")
    assert manifest.num_rows == 24
    ok = manifest.column("status").to_pylist().count("success")
    assert ok >= 18  # the world fails 2 % of its URLs on purpose
    assert any(line.split()[:2] == ["success", str(ok)] for line in out.splitlines()), out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_retry_only_the_failed_urls(tmp_path, tiny_world, world_server):
    """The first run finds half the URLs' server down (connection refused: transient); with it up,
    ``--retry-failed`` downloads only those again, into new shards, and recovers them."""
    from vlp_core.synthetic.server import serve_world

    first = readme_command("vlp ingest --urls my_urls.parquet --out data/ingest/web", exact=True)
    retry = readme_command("vlp ingest --urls my_urls.parquet --out data/ingest/web --retry-failed", exact=True)
    port = _free_port()
    _url_list(tiny_world, world_server.base_url, tmp_path / "my_urls.parquet", 20,
              dead_base=f"http://127.0.0.1:{port}")
    (tmp_path / "params.yaml").write_text("ingest: {processes_count: 1, number_sample_per_shard: 5}\n")
    hosts = f"{world_server.host_port},127.0.0.1:{port}"
    out1 = run(first, tmp_path, VLP_ALLOWED_HOSTS=hosts).stdout
    shards = tmp_path / "data" / "ingest" / "web" / "shards"
    before = sorted(p.name for p in shards.glob("*.tar"))
    assert len(before) == 4 and "failed_to_download" in out1
    with serve_world(tiny_world, port=port):
        out2 = run(retry, tmp_path, VLP_ALLOWED_HOSTS=hosts).stdout
    line = next(ln for ln in out2.splitlines() if ln.startswith("retry: "))
    assert line.startswith("retry: 10 transient failures downloaded again, 10 recovered, 0 still failing"), out2
    assert sorted(p.name for p in shards.glob("*.tar"))[:4] == before  # the old shards stay, new ones follow
    manifest = pq.read_table(tmp_path / "data" / "ingest" / "web" / "manifest.parquet")
    assert manifest.num_rows == 20 and manifest.column("status").to_pylist().count("success") >= 18


# --------------------------------------------------------------------------- the catalog
ROWS = {  # (key, candidate, text, source, itm, kept, reason)
    0: [("k1", 0, "a red cube", "web", 0.9, True, None), ("k1", 1, "a red cube left of a ball", "synthetic", 0.8, True, None),
        ("k2", 0, "click here", "web", 0.1, False, "itm_below_threshold"), ("k3", 0, "a green cone", "web", 0.6, True, None)],
    1: [("k1", 0, "a red cube", "web", 0.95, True, None), ("k1", 1, "a red cube above a ball", "synthetic", 0.75, True, None),
        ("k1", 2, "a red cube", "synthetic", 0.72, True, None), ("k2", 0, "click here", "web", 0.1, False, "itm_below_threshold"),
        ("k2", 1, "a blue ball", "synthetic", 0.6, True, None), ("k4", 0, "a yellow star", "web", 0.65, True, None)],
}


def _round(work: Path, k: int) -> None:
    """A stand-in for round k's CapFilt stage (corpus + calibration scores) and evaluation."""
    cols = ["key", "candidate", "text", "source", "itm", "kept", "reason"]
    data = {c: [r[i] for r in ROWS[k]] for i, c in enumerate(cols)}
    n = len(ROWS[k])
    data.update({"url": [f"/web/{key}.jpg" for key in data["key"]], "shard": ["shards/00000.tar"] * n,
                 "itc": [s - 0.1 for s in data["itm"]], "round": [k] * n})
    stage = work / "data" / f"round{k}" / "capfilt"
    write_parquet(conform(pa.table(data), CORPUS_SCHEMA), stage / "corpus" / "00000.parquet")
    write_parquet(pa.table({"itm": pa.array([0.5, 0.6, 0.7, 0.8, 0.9], pa.float32())}), stage / "calibration.parquet")
    write_json({"retrieval": {"r1_mean": 0.2 + 0.1 * k}, "bleu4": 0.1}, work / "data" / f"round{k}" / "evaluate" / "metrics.json")


def test_comparing_versions(tmp_path):
    """``vlp versions list|diff``, ``vlp query``, both rethresholds and ``vlp report`` on a catalog of
    two recorded rounds (recorded with ``vlp record``, as the flows do)."""
    for k in (0, 1):
        _round(tmp_path, k)
        run(["vlp", "record", "--name", f"round{k}", "--corpus", f"data/round{k}/capfilt", "--round", str(k),
             "--metrics", f"data/round{k}/evaluate/metrics.json"], tmp_path)
    listed = run(readme_command("vlp versions list"), tmp_path).stdout.splitlines()
    assert listed[0].split()[:3] == ["name", "created", "round"]
    assert [ln.split()[0] for ln in listed[2:]] == ["round0", "round1"]
    diff = run(readme_command("vlp versions diff"), tmp_path).stdout
    assert diff.startswith("versions round0 -> round1") and "rows           4 -> 6" in diff
    q = readme_command("vlp query")
    assert len(q) == 3 and "FROM corpus" in q[2]
    rows = run(q, tmp_path).stdout.splitlines()
    assert rows[0].split() == ["version", "source", "avg(itm)", "avg(CAST(kept", "AS", "INTEGER))"]
    assert [r.split()[:2] for r in rows[2:]] == [["round0", "synthetic"], ["round0", "web"],
                                                 ["round1", "synthetic"], ["round1", "web"]]
    fixed = run(readme_command("vlp capfilt rethreshold --corpus data/round1/capfilt --itm-threshold 0.7"),
                tmp_path).stdout
    assert "ITM threshold 0.7000" in fixed
    kept = pq.read_table(tmp_path / "data" / "rethreshold_0.7" / "corpus" / "00000.parquet").column("kept").to_pylist()
    assert kept == [True, True, True, False, False, False]  # itm > 0.7: 0.95, 0.75, 0.72
    top1 = run(readme_command("vlp capfilt rethreshold --corpus data/round1/capfilt --out data/top1"), tmp_path).stdout
    assert "ITM threshold 0.5400" in top1  # the 10th percentile of the stored calibration scores
    t = pq.read_table(tmp_path / "data" / "top1" / "corpus" / "00000.parquet").to_pylist()
    assert [(r["candidate"], r["kept"]) for r in t if r["key"] == "k1"] == [(0, True), (1, True), (2, False)]
    report = run(readme_command("vlp report"), tmp_path).stdout
    assert report.strip() == "report: report/index.html"
    assert "round1" in (tmp_path / "report" / "index.html").read_text()
