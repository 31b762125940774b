"""No stage depends on the current folder (issue 18): every path is resolved against the
layout's root, which the flows make absolute once (:meth:`vlp_core.layout.Layout.at`).

The same ingest and CapFilt run twice on the same inputs: the CLI's way (inside the work dir,
root ``"."``, relative paths) and the flows' way (Prefect tasks on the thread-pool runner, the
work dir given as an absolute root, the process standing in an unrelated folder).  Both write
the same files -- the manifest's shard references relative to the work dir in both -- and the
flows' run neither changes the current folder nor writes anything into it.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from fixtures_world import tiny_params
from flows import tasks as T
from vlp_core import rounds as R
from vlp_core.capfilt import stage as cs
from vlp_core.io import read_json
from vlp_core.layout import Layout
from vlp_core.schema import C

SETTINGS = {"capfilt.num_captions": 1, "capfilt.threshold_mode": "fixed", "capfilt.precision": "fp32",
            "capfilt.max_length": 8, "capfilt.batch_size": 8, "ingest.number_sample_per_shard": 20}


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _workdir(root: Path, world: Path, base_url: str) -> Path:
    from vlp_core.synthetic.server import write_url_list

    write_url_list(world, "web", base_url, root / "data" / "urls" / "web.parquet")
    return root


def _model(world: Path, out: Path) -> Path:
    import torch

    from vlp_core.models import create_model, train_tokenizer

    torch.manual_seed(0)
    texts = [t for t in pq.read_table(world / "web.parquet")[C.CAPTION].to_pylist() if t and t.strip()]
    return create_model("tiny", train_tokenizer(texts, vocab_size=128)).save_pretrained(out)


def _corpus(layout_root: Path) -> list[dict]:
    files = sorted((layout_root / "data" / "round0" / "capfilt" / "corpus").glob("*.parquet"))
    assert files
    t = pq.read_table(files).sort_by([(C.KEY, "ascending"), (C.CANDIDATE, "ascending")])
    return t.to_pylist()


def test_a_flow_on_the_thread_pool_writes_what_the_cli_writes_from_any_folder(
        harness, tmp_path, tiny_world, world_server, monkeypatch):
    from prefect import flow
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect.utilities.annotations import unmapped

    params = tiny_params(**SETTINGS)
    model = str(_model(tiny_world, tmp_path / "model"))

    # the CLI's way: inside the work dir, every path relative to it
    cli_dir = _workdir(tmp_path / "cli", tiny_world, world_server.base_url)
    monkeypatch.chdir(cli_dir)
    here = Layout(Path("."))
    R.run_step(params, here, R.ingest_step(params, here, "web"), [])
    cs.run_capfilt(params, here.manifest("web"), model, model, here.stage(0, "capfilt"), root=here.root)

    # the flows' way: an absolute root, tasks in worker threads, the process elsewhere
    flow_dir = _workdir(tmp_path / "flow", tiny_world, world_server.base_url)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    layout = Layout.at(flow_dir)

    @flow(task_runner=ThreadPoolTaskRunner(max_workers=2))
    def small_round() -> list[dict]:
        web = R.ingest_step(params, layout, "web")
        T.unwrap(T.step_task(params, web)(params, layout, web, []))
        shards = cs.list_capfilt_shards(layout.manifest("web"))
        assert len(shards) >= 2  # the fan-out really runs side by side
        futures = T.capfilt_shard_task.map(unmapped(params), layout, 0, shards, model, model, unmapped(None))
        return [f.result() for f in futures]

    shard_stats = small_round()
    assert Path.cwd() == elsewhere and not any(elsewhere.iterdir())  # no chdir, nothing written here
    assert all(not s["skipped"] for s in shard_stats)

    # the same manifest, its shard references relative to the work dir in both
    want = pq.read_table(cli_dir / "data" / "ingest" / "web" / "manifest.parquet")
    got = pq.read_table(flow_dir / "data" / "ingest" / "web" / "manifest.parquet")
    refs = {r for r in got[C.SHARD].to_pylist() if r}
    assert refs and all(r.startswith("data/ingest/web/shards/") for r in refs)
    assert got.to_pylist() == want.to_pylist()
    stats = read_json(flow_dir / "data" / "ingest" / "web" / "stats.json")
    assert stats["extra"]["urls"] == "data/urls/web.parquet"  # written relative, not absolute
    marker = read_json(layout.marker("ingest_web"))
    assert marker["out_dir"] == "data/ingest/web"

    # the same corpus rows (the images read back through those references)
    a, b = _corpus(cli_dir), _corpus(flow_dir)
    assert len(a) == len(b) and any(not str(r[C.REASON] or "").startswith("image_decode_error") for r in b)
    for ra, rb in zip(a, b):
        for col, va in ra.items():
            if isinstance(va, float):
                assert np.isclose(va, rb[col], rtol=0, atol=1e-6), (ra[C.KEY], col)
            else:
                assert va == rb[col], (ra[C.KEY], col)


@pytest.mark.parametrize("path, root, written", [
    ("data/ingest/web/shards", ".", "data/ingest/web/shards"),  # the CLI's root: as given
    ("/w/data/ingest/web/shards", "/w", "data/ingest/web/shards"),  # the flows': relative to the root
    ("/elsewhere/shards", "/w", "/elsewhere/shards"),  # outside an absolute root: stays absolute
    ("runs/s0/data/x", "runs/s0", "data/x"),  # a relative root (a benchmark's work dir)
    ("other/x", "runs/s0", "../../other/x"),
    ("/abs/x", "runs/s0", "/abs/x"),
])
def test_paths_are_written_relative_to_the_root_and_resolve_back(path, root, written):
    from vlp_core.layout import as_written, resolve

    assert as_written(path, root) == written
    assert os.path.normpath(resolve(written, root)) == os.path.normpath(path)
