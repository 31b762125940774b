"""Prefect flows on the real stages: stage cache, resume after a failure, and DVC
consistency (a flow's stages are committed to dvc.lock, so `dvc status` is clean), in a
real git + DVC repo in a temp dir.  Flows run under ``prefect_test_harness``; tasks are
also called through ``.fn()``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows import tasks as T
from vlp_core.rounds import after as _after
from vlp_core import versioning as V
from vlp_core.config import Params

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


def _tiny_params_yaml(path: Path) -> None:
    from fixtures_world import TINY_INGEST, TINY_SIZES

    data = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in {**TINY_SIZES, **TINY_INGEST}.items():
        section, key = dotted.split(".")
        data[section][key] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


@pytest.fixture()
def dvc_repo(tmp_path, tiny_world, world_server):
    """A git + DVC repo with this project's dvc.yaml, code deps, tiny params and URL lists."""
    from vlp_core.synthetic.server import write_url_list

    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "vlp_core", root / "vlp_core", ignore=shutil.ignore_patterns("__pycache__"))
    _tiny_params_yaml(root / "params.yaml")
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    for split in T.SPLITS:
        write_url_list(tiny_world, split, world_server.base_url, root / "data" / "urls" / f"{split}.parquet")
    V.git(["init", "-q"], root)
    V.dvc(["init", "-q"], root)
    V.git(["add", "."], root)
    V.git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], root)
    return root


def test_permanent_errors_are_not_retried(harness):
    from prefect import flow, task

    calls = []

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=T.retry_unless_permanent)
    def flaky(exc: BaseException):
        calls.append(type(exc).__name__)
        raise exc

    @flow
    def run(exc: BaseException) -> bool:
        return flaky(exc, return_state=True).is_failed()

    from vlp_core.errors import VlpError

    assert run(VlpError("bad setting")) and calls == ["VlpError"]  # once: it cannot pass
    calls.clear()
    assert run(ConnectionError("reset")) and calls == ["ConnectionError"] * 3  # 1 + 2 retries


def test_only_tracked_overrides_block_dvc_commit():
    assert not T.tracked_overrides(["orchestration.fail_before=x", "orchestration.task_runner=dask"])
    assert T.tracked_overrides(["orchestration.retries=1", "capfilt.itm_threshold=0.7"])
    assert T.tracked_overrides(["catalog.path=x.duckdb"])  # the record stage reads it


def test_until_names():
    assert not _after("ingest", "ingest") and _after("pretrain", "ingest")
    assert not _after("finetune", "finetune_filter") and _after("capfilt", "finetune_captioner")
    assert not _after("record", None)
    with pytest.raises(T.FlowStageError, match="not a step"):
        _after("ingest", "nonsense")


def test_stage_cache_key_and_skip(tmp_path):
    """The marker skips an unchanged stage and re-runs it when a setting it reads changes."""
    layout = T.Layout(tmp_path)
    out = tmp_path / "out"
    calls = []

    def run():
        calls.append(1)
        out.mkdir(exist_ok=True)
        (out / "stats.json").write_text('{"rows_in": 1, "rows_out": 1}')

    p = Params()
    r1 = T.cached_stage(p, layout, "features", 0, out, ["features"], [], [], run)
    r2 = T.cached_stage(p, layout, "features", 0, out, ["features"], [], [], run)
    assert (r1["skipped"], r2["skipped"], len(calls)) == (False, True, 1)
    assert r2["stats"]["rows_out"] == 1 and r1["key"] == r2["key"]
    # a setting the stage does not read changes nothing
    assert T.cached_stage(p.replace(**{"capfilt.top_p": 0.5}), layout, "features", 0, out, ["features"], [], [],
                          run)["skipped"]
    # one it reads, or an upstream key, re-runs it
    r3 = T.cached_stage(p.replace(**{"features.batch_size": 8}), layout, "features", 0, out, ["features"], [], [],
                        run)
    r4 = T.cached_stage(p.replace(**{"features.batch_size": 8}), layout, "features", 0, out, ["features"],
                        [{"key": "other"}], [], run)
    assert (r3["skipped"], r4["skipped"], len(calls)) == (False, False, 3)
    # the output vanished: re-run even with the same key
    (out / "stats.json").unlink()
    assert not T.cached_stage(p.replace(**{"features.batch_size": 8}), layout, "features", 0, out, ["features"],
                              [{"key": "other"}], [], run)["skipped"]
    with pytest.raises(T.FlowStageError, match="fail_before"):
        T.cached_stage(p.replace(**{"orchestration.fail_before": "retrain"}), layout, "retrain", 0,
                       tmp_path / "r", ["pretrain"], [], [], run)


def test_training_stage_starts_fresh_only_when_its_inputs_changed(tmp_path):
    """A training stage resumes its checkpoint after a crash (no marker yet) but starts afresh
    when the marker holds another key: the settings changed, and the old checkpoint (whose
    fingerprint no longer matches) must not be resumed."""
    layout = T.Layout(tmp_path)
    out = tmp_path / "out"
    calls = []

    def run(fresh):
        calls.append(fresh)
        out.mkdir(exist_ok=True)
        (out / "stats.json").write_text('{"rows_in": 1, "rows_out": 1}')

    p = Params()
    T.cached_stage(p, layout, "retrain", 0, out, ["pretrain"], [], [], run, pass_fresh=True)  # first run
    T.cached_stage(p, layout, "retrain", 0, out, ["pretrain"], [], [], run, pass_fresh=True)  # cached
    T.cached_stage(p.replace(**{"pretrain.lr": 0.002}), layout, "retrain", 0, out, ["pretrain"], [], [], run,
                   pass_fresh=True)  # settings changed
    (out / "stats.json").unlink()  # a crash before the end: same key, no output
    T.cached_stage(p.replace(**{"pretrain.lr": 0.002}), layout, "retrain", 0, out, ["pretrain"], [], [], run,
                   pass_fresh=True)
    assert calls == [False, True, False]


def test_ingest_task_fn_is_one_call_and_cached(tmp_path, tiny_world, world_server):
    """The ingest step's task runs the real ingest once; the second call is a cache hit, which
    Prefect is told is Cached."""
    from fixtures_world import tiny_params
    from vlp_core.synthetic.server import write_url_list

    layout = T.Layout(tmp_path)
    write_url_list(tiny_world, "test", world_server.base_url, layout.urls("test"))
    params = tiny_params()
    from vlp_core.rounds import ingest_step

    step = ingest_step(params, layout, "test")
    first = T.stage_task.fn(params, layout, step, [])
    second = T.stage_task.fn(params, layout, step, [])
    assert first["skipped"] is False and second.name == "Cached" and second.result()["skipped"] is True
    assert first["stats"]["rows_in"] == first["stats"]["rows_out"] == 100
    assert layout.manifest("test").exists()
    with pytest.raises(T.FlowStageError, match="URL list not found"):
        T.stage_task.fn(params, layout, ingest_step(params, layout, "human"), [])


@pytest.mark.slow
def test_flow_resumes_and_dvc_status_is_clean(harness, dvc_repo):
    """A run that fails before ingest_test leaves web + human done; the rerun skips them,
    runs ingest_test, commits the three stages to dvc.lock, and `dvc status` is clean."""
    from flows.bootstrap import bootstrap_flow

    with pytest.raises(T.FlowStageError, match="fail_before"):
        bootstrap_flow(workdir=str(dvc_repo), until="ingest", overrides=("orchestration.fail_before=ingest_test",))
    layout = T.Layout(dvc_repo)
    assert layout.manifest("web").exists() and layout.manifest("human").exists()
    assert not layout.manifest("test").exists()
    assert not (dvc_repo / "dvc.lock").exists()  # overridden settings are never committed

    res = bootstrap_flow(workdir=str(dvc_repo), until="ingest")
    assert [res[f"ingest_{s}"]["skipped"] for s in T.SPLITS] == [True, True, False]
    assert res["version"]["dvc_committed"] == ["ingest_web", "ingest_human", "ingest_test"]
    assert res["version"]["tag"] is None  # an incomplete round is not tagged
    assert V.dvc_status(dvc_repo, ["ingest_web", "ingest_human", "ingest_test"]) == {}
    lock = yaml.safe_load((dvc_repo / "dvc.lock").read_text())["stages"]
    recorded = lock["ingest_web"]["params"]["params.yaml"]
    assert recorded["ingest.number_sample_per_shard"] == 100
    assert "ingest.allowed_hosts" not in recorded  # a network policy, not an input
    assert set(V.dvc_lock_hashes(dvc_repo)) == {"ingest_web", "ingest_human", "ingest_test"}

    # the round's table artifact holds the stage stats
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.utilities.asyncutils import run_coro_as_sync

    async def artifacts():
        async with get_client() as c:
            flt = ArtifactFilter(key=ArtifactFilterKey(any_=["round-0-stages"]))
            return await c.read_artifacts(artifact_filter=flt)

    arts = run_coro_as_sync(artifacts())
    assert arts and arts[0].type == "table"
    rows = {r["stage"]: r for r in json.loads(arts[0].data)}
    assert (rows["ingest_test"]["state"], rows["ingest_test"]["rows in"], rows["ingest_test"]["rows out"]) == (
        "ran", 100, 100)
    assert rows["ingest_web"]["state"] == "cached"

    async def task_run_names():
        async with get_client() as c:
            return {t.name for t in await c.read_task_runs()}

    names = run_coro_as_sync(task_run_names())  # which split / round, not a random suffix
    assert {"ingest-web", "ingest-human", "ingest-test", "version-round0"} <= names, names

    # `dvc repro` reproduces a stage without Prefect: same manifest as the flow's
    import pyarrow.parquet as pq

    before = pq.read_table(layout.manifest("test")).sort_by("row_index")
    env_bin = str(Path(sys.executable).parent)
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro", "-f", "ingest_test"], cwd=dvc_repo,
                          capture_output=True, text=True,
                          env={**os.environ, "PATH": env_bin + os.pathsep + os.environ["PATH"]})
    assert proc.returncode == 0, proc.stderr[-2000:]
    after = pq.read_table(layout.manifest("test")).sort_by("row_index")
    assert after.equals(before)
    assert V.dvc_status(dvc_repo, ["ingest_web", "ingest_human", "ingest_test"]) == {}

    # a changed setting makes DVC see the stages as changed, and the flow re-run them
    text = (dvc_repo / "params.yaml").read_text().replace("timeout: 5", "timeout: 6")
    (dvc_repo / "params.yaml").write_text(text)
    assert "ingest_test" in V.dvc_status(dvc_repo, ["ingest_test"])
    res = bootstrap_flow(workdir=str(dvc_repo), until="ingest")
    assert [res[f"ingest_{s}"]["skipped"] for s in T.SPLITS] == [False, False, False]
    assert V.dvc_status(dvc_repo, ["ingest_web", "ingest_human", "ingest_test"]) == {}


def test_cli_run_until_ingest(dvc_repo, harness):
    """`vlp run --until ingest` through the CLI, with a bad setting refused first."""
    env_py = [sys.executable, "-m", "flows.cli"]
    bad = subprocess.run(env_py + ["run", "--until", "ingest", "-S", "ingest.nope=1"], cwd=dvc_repo,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "ingest.nope" in bad.stderr


def test_record_task_fn_records_the_round(tmp_path):
    """The record step snapshots the round's corpus, stats and metrics into the catalog."""
    import pyarrow as pa

    from vlp_core.catalog import list_versions, query
    from vlp_core.io import write_json, write_parquet
    from vlp_core.schema import CORPUS_SCHEMA, conform

    layout = T.Layout(tmp_path)
    rows = {"key": ["a", "a", "b"], "candidate": [0, 1, 0], "text": ["x", "y", "z"],
            "source": ["web", "synthetic", "web"], "itm": [0.9, 0.2, 0.7], "kept": [True, False, True],
            "round": [2, 2, 2], "url": ["/web/a.jpg", "/web/a.jpg", "/web/b.jpg"]}
    write_parquet(conform(pa.table(rows), CORPUS_SCHEMA), layout.stage(2, "capfilt") / "corpus" / "00000.parquet")
    write_json({"stage": "capfilt", "rows_in": 2, "rows_out": 2}, layout.stage(2, "capfilt") / "stats.json")
    write_json({"retrieval": {"r1_mean": 0.3}}, layout.stage(2, "evaluate") / "metrics.json")
    params = Params().replace(**{"catalog.path": "cat.duckdb"})
    from vlp_core.rounds import record_step

    step = record_step(params, layout, 2, ["round2-evaluate"])
    first = T.stage_task.fn(params, layout, step, [{"key": "up"}])
    assert first["skipped"] is False
    assert (layout.record_marker(2)).exists()
    v = list_versions(tmp_path / "cat.duckdb")
    assert [(d["name"], d["round"], d["rows"], d["kept"]) for d in v] == [("round2", 2, 3, 2)]
    assert v[0]["metrics"] == {"evaluate.retrieval.r1_mean": 0.3}
    assert query(tmp_path / "cat.duckdb", "SELECT stage, rows_in FROM stage_stats")[1] == [("capfilt", 2)]
    assert T.unwrap(T.stage_task.fn(params, layout, step, [{"key": "up"}]))["skipped"] is True


def test_project_logs_reach_the_prefect_run(harness, tmp_path):
    """A step's log lines -- its own, and those of a training child it spawns (in_fresh_process
    relays them) -- are in the Prefect run's logs; without a terminal tqdm's bar shows nothing."""
    import logging

    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from fixtures_world import log_in_child
    from vlp_core.layout import Layout
    from vlp_core.rounds import Step
    from vlp_core.train.loop import in_fresh_process

    def call() -> None:
        logging.getLogger("vlp_core.capfilt.stage").info("hello from the task")
        assert in_fresh_process(log_in_child, "hello from a child") == 7
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "stats.json").write_text("{}")

    params = Params()
    step = Step("features", 0, tmp_path / "out", (), (), call, task="features", run_name="features-round0")

    @flow
    def logs_flow() -> dict:
        return T.unwrap(T.step_task(params, step)(params, Layout(tmp_path), step, []))

    state = logs_flow(return_state=True)
    assert state.is_completed()
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        run_id = state.state_details.flow_run_id
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    messages = [entry.message for entry in logs]
    assert "hello from the task" in messages and "hello from a child" in messages, messages
    assert [t.name for t in task_runs] == ["features-round0"]
