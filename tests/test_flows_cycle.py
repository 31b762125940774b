"""The end-to-end smoke test: ``demo_flow`` on a tiny world (300 web pairs, a few steps) in a
real git + DVC repo -- the synthetic world, served on 127.0.0.1 and ingested with img2dataset,
two bootstrap rounds through every stage, the controls and the comparison table.  The counts
add up at every stage, every stage is committed (``dvc status`` clean), rounds are tagged,
the catalog holds round0 and round1 and can diff them, the report and the table are written,
and ``cycles_flow`` over the same repo skips everything.  Then the nightly flow CapFilts new
shards with the latest round, and the CapFilt shard fan-out on a real local Dask cluster
(2 workers) gives the same corpus as the default thread runner.  The model gain is not
asserted here (bench/cycle.py measures it)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml


from flows import tasks as T  # noqa: E402
from vlp_core import versioning as V  # noqa: E402

REPO = Path(__file__).resolve().parent.parent

FAST = {
    "pretrain.steps": 6, "pretrain.batch_size": 16, "pretrain.warmup_steps": 2, "pretrain.log_every": 2,
    "pretrain.checkpoint_every": 100,
    "finetune.captioner.steps": 3, "finetune.captioner.batch_size": 16, "finetune.captioner.warmup_steps": 1,
    "finetune.captioner.log_every": 1,
    "finetune.filter.steps": 3, "finetune.filter.batch_size": 16, "finetune.filter.warmup_steps": 1,
    "finetune.filter.log_every": 1,
    "capfilt.batch_size": 64, "capfilt.max_length": 12, "evaluate.batch_size": 64, "evaluate.k_test": 4,
    "features.batch_size": 64,
    # at these budgets a round's gain is noise: every round is promoted here (the gate's both paths:
    # tests/test_gate.py and tests/test_flows_gate.py)
    "gate.enabled": False,
}


def _params_yaml(path: Path, extra: dict) -> None:
    from fixtures_world import TINY_INGEST, TINY_SIZES

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_SIZES, **TINY_INGEST, **FAST, **extra}.items():
        cur = data
        *head, last = dotted.split(".")
        for part in head:
            cur = cur[part]
        cur[last] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="module")
def cycled(tmp_path_factory, harness):
    """A repo after ``demo_flow(rounds=2)`` (the flow ``vlp demo`` runs)."""
    from flows.demo import demo_flow

    root = tmp_path_factory.mktemp("cycle") / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "vlp_core", root / "vlp_core", ignore=shutil.ignore_patterns("__pycache__"))
    _params_yaml(root / "params.yaml", {})  # the demo allows its own server (ingest.allowed_hosts)
    (root / ".gitignore").write_text("/data/\n__pycache__/\n/report/\n")
    V.git(["init", "-q"], root)
    V.dvc(["init", "-q"], root)
    V.git(["add", "."], root)
    V.git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], root)
    result = demo_flow(workdir=str(root), rounds=2, port=0)
    return root, result


def test_counts_add_up_at_every_stage(cycled):
    root, result = cycled
    data = root / "data"
    for split in T.SPLITS:  # ingest: one manifest row per URL row
        urls = pq.read_table(data / "urls" / f"{split}.parquet").num_rows
        assert pq.read_table(data / "ingest" / split / "manifest.parquet").num_rows == urls > 0
    web = pq.read_table(data / "ingest" / "web" / "manifest.parquet")
    for k in (0, 1):
        stats = json.loads((data / f"round{k}" / "capfilt" / "stats.json").read_text())
        corpus = pq.read_table(sorted((data / f"round{k}" / "capfilt" / "corpus").glob("*.parquet")))
        skipped = sum(v for n, v in stats["counts"].items() if n.startswith("skipped:"))
        # every web row: an image with 1 + K candidates, or a skipped (failed) row
        assert stats["extra"]["images"] + skipped == web.num_rows
        assert stats["rows_in"] == stats["rows_out"] == corpus.num_rows
        assert corpus.num_rows == stats["extra"]["images"] * stats["extra"]["candidates_per_image"]
        kept = sum(corpus.column("kept").to_pylist())
        assert kept == sum(v for n, v in stats["counts"].items() if n.startswith("kept:"))
        assert corpus.num_rows - kept == sum(v for n, v in stats["counts"].items() if n.startswith("reason:"))
        feats = json.loads((data / f"round{k}" / "features" / "stats.json").read_text())
        assert feats["rows_in"] == feats["rows_out"] == corpus.num_rows
    # the comparison: six models, each trained for the same steps
    table = json.loads((data / "comparison" / "results.json").read_text())["models"]
    assert [m["name"] for m in table] == ["pretrained", "round 0", "round 1", "filter-only", "human-only", "oracle"]
    assert all("r1_mean" in m["metrics"] for m in table)
    assert table[3]["sizes"].get("synthetic", 0) == 0 and table[1]["sizes"]["synthetic"] > 0
    assert set(table[4]["sizes"]) == {"human"}
    assert "oracle" in result["table"] and (data / "comparison" / "table.md").exists()


@pytest.mark.slow
def test_two_rounds_versioned_and_comparable(cycled):
    from vlp_core.catalog import diff_versions, list_versions

    root, result = cycled

    def stage_results(r):
        return {n: v for n, v in r.items() if isinstance(v, dict) and "skipped" in v}

    r0, r1 = stage_results(result["round0"]), stage_results(result["round1"])
    assert not any(v["skipped"] for v in r0.values()), r0
    assert all(r1[f"ingest_{s}"]["skipped"] for s in T.SPLITS)  # shared, unchanged
    for name in ("finetune_captioner", "finetune_filter", "capfilt", "features", "retrain", "evaluate", "record"):
        assert r1[name]["skipped"] is False
    for k in (0, 1):
        assert result[f"round{k}"]["version"]["tag"] == f"round-{k}"
    # round 1 fine-tuned from round 0's retrained model
    assert (root / "data" / "round1" / "finetune_captioner" / "model").exists()
    # every stage that ran is in dvc.lock and up to date
    stages = [s for s in V.dvc_stage_names(root) if s != "synthetic"]
    assert V.dvc_status(root, stages) == {}
    assert set(V.git(["tag"], root).stdout.split()) >= {"round-0", "round-1"}
    # the catalog compares the two versions
    cat = root / "data" / "catalog.duckdb"
    assert [(v["name"], v["state"]) for v in list_versions(cat)] == [("round0", "promoted"), ("round1", "promoted")]
    d = diff_versions(cat, "round0", "round1")
    assert d.rows_a > 0 and d.rows_b > 0 and d.rows_matched > 0
    assert set(d.by_source) >= {"web", "synthetic"}
    assert any(k.startswith("evaluate.") for k in d.metrics)
    assert (root / "report" / "index.html").exists()


@pytest.mark.slow
def test_rerun_skips_everything(cycled):
    """``cycles_flow`` over the demo's repo: the same stages, all unchanged."""
    from flows.cycles import cycles_flow

    root, _ = cycled
    # the network policy is not an input: the demo's allowed server does not change any stage
    again = cycles_flow(rounds=2, workdir=str(root), return_state=True)
    for k in (0, 1):
        ran = [n for n, v in again.result()[f"round{k}"].items() if isinstance(v, dict) and v.get("skipped") is False]
        assert ran == [], f"round {k} re-ran {ran}"
    # Prefect shows what the stage cache skipped as Cached, under names that say the stage and its
    # split / target / round; the runs left table artifacts and a link to the report
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[again.state_details.flow_run_id])))
        keys = ["round-0-stages", "round-1-metrics", "vlp-comparison", "vlp-report"]
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))
    states = {r.name: r.state.name for r in runs}
    for name in ("ingest-web", "pretrain-round0", "finetune-filter-round1", "capfilt-round1", "retrain-round0",
                 "evaluate-pretrain-round0", "record-round1"):
        assert states.get(name) == "Cached", (name, states)
    # (Prefect stores a link artifact as markdown: "[text](url)")
    assert {a.key: a.type for a in artifacts} == {"round-0-stages": "table", "round-1-metrics": "table",
                                                  "vlp-comparison": "table", "vlp-report": "markdown"}
    link = next(a for a in artifacts if a.key == "vlp-report").data
    assert link.startswith("[vlp report (HTML)](file://") and link.endswith("report/index.html)")


@pytest.mark.slow
def test_capfilt_fanout_on_dask_equals_default(cycled, tmp_path):
    """Round 0's CapFilt re-run on a real LocalCluster (2 worker processes) gives the same corpus."""
    from flows.bootstrap import bootstrap_flow, task_runner_for
    from vlp_core.config import load_params

    root, _ = cycled
    copy = tmp_path / "repo"
    shutil.copytree(root, copy, symlinks=True)
    shutil.rmtree(copy / "data" / "round0" / "capfilt")
    (copy / "data" / ".flow" / "round0-capfilt.json").unlink()
    _params_yaml(copy / "params.yaml", {"orchestration.task_runner": "dask", "orchestration.dask_workers": 2,
                                        "orchestration.dvc_commit": False, "orchestration.git_tag": False})
    params = load_params(copy / "params.yaml")
    runner = task_runner_for(params)
    assert type(runner).__name__ == "DaskTaskRunner"
    res = bootstrap_flow.with_options(task_runner=runner)(workdir=str(copy), until="capfilt")
    assert res["capfilt"]["skipped"] is False

    def corpus(r: Path):
        files = sorted((r / "data" / "round0" / "capfilt" / "corpus").glob("*.parquet"))
        t = pq.read_table(files).sort_by([("key", "ascending"), ("candidate", "ascending")])
        return t.select(["key", "candidate", "text", "source", "kept", "reason"]).to_pylist(), t

    a_rows, a = corpus(root)
    b_rows, b = corpus(copy)
    assert len(a_rows) > 0 and a_rows == b_rows
    for col in ("itc", "itm"):
        assert a.column(col).to_pylist() == pytest.approx(b.column(col).to_pylist(), abs=1e-4, nan_ok=True)
