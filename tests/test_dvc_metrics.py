"""DVC metrics, plots and experiments across versions, with real ``git`` and ``dvc``.

Two rounds are recorded in the demo's own repo layout (:func:`flows.demo.prepare_demo_repo`:
the project's dvc.yaml, the demo's .gitignore) the way the flows record them -- the stage
files written, the catalog version recorded, then :func:`flows.bootstrap.version_task`
(``dvc commit``, git commit + tag ``round-N``).  The stage files are small stand-ins written here
(the training loss logs by the real :class:`vlp_core.train.loop.LossLog`); what is tested is what
git and DVC make of them: ``dvc metrics diff round-0 round-1`` shows the evaluation metrics and
only them, ``dvc plots diff`` draws each training stage's loss against its step, ``dvc status`` is
clean for the committed stages, and the catalog versions carry the tags' revisions and hashes.
Then ``dvc exp run`` of a ``vlp record`` stage records its version under the experiment's name.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from flows import tasks as T
from flows.bootstrap import version_task
from flows.demo import prepare_demo_repo
from vlp_core import catalog
from vlp_core import versioning as V
from vlp_core.config import Params, load_params
from vlp_core.io import write_json
from vlp_core.layout import Layout
from vlp_core.train.loop import LossLog

REPO = Path(__file__).resolve().parent.parent
TRAINED = ("finetune_captioner", "finetune_filter", "retrain")


def _touch(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_round(layout: Layout, k: int) -> dict[str, float]:
    """Round k's stage files (stats, loss logs, evaluation metrics) and the inputs its committed
    stages depend on; returns the r1_mean written for round k's model."""
    for split in ("web", "human", "test"):
        _touch(layout.shards(split) / "00000.tar", f"shard {split}")
        _touch(layout.manifest(split), f"manifest {split}")
    _touch(layout.ground_truth, "gt")
    _touch(layout.corpus(k) / "00000.parquet", f"corpus {k}")
    trained = TRAINED + (("pretrain",) if k == 0 else ())
    for name in trained:
        d = layout.stage(k, name)
        _touch(d / "model" / "model.safetensors", f"{name} {k}")
        _touch(d / "checkpoint" / "trainer_state.pt", f"{name} {k}")
        log = LossLog(d / "loss.csv", 0, True)
        for step in (1, 2, 3):
            log.add({"loss": 3.0 - step * 0.5 - k * 0.1, "itc": 1.0, "itm": 0.5, "lm": 1.5})
            log.flush(step, 1e-4)
    for name in ("capfilt", "features") + trained:
        write_json({"stage": name, "rows_in": 10, "rows_out": 10, "counts": {"kept": 7}, "seconds": 1.5,
                    "extra": {"note": "a string"}}, layout.stage(k, name) / "stats.json")
    r1 = {"evaluate": 0.30 + 0.1 * k, "evaluate_base": 0.20}
    evaluated = ("evaluate", "evaluate_base") if k == 0 else ("evaluate",)
    for name in evaluated:
        d = layout.stage(k, name)
        _touch(d / "captions.parquet", f"captions {name} {k}")
        write_json({"retrieval": {"r1_mean": r1[name], "tr_r1": r1[name] + 0.05}, "caption_accuracy": 0.4 + k / 10,
                    "settings": {"prompt": "a picture of"}}, d / "metrics.json")
    return {name: r1[name] for name in evaluated}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """The demo repo after rounds 0 and 1 were recorded and tagged."""
    root = prepare_demo_repo(tmp_path_factory.mktemp("dvcm") / "demo", REPO / "params.yaml")
    params = load_params(str(root / "params.yaml"))
    layout = Layout(root)
    done, r1 = [], {}
    for k in (0, 1):
        r1[k] = _write_round(layout, k)
        metrics = [layout.stage(k, n) / "metrics.json" for n in ("evaluate_base", "evaluate")]
        catalog.record_version(params, f"round{k}", None, [], [m for m in metrics if m.exists()], repo_dir=root,
                               round=k, catalog=root / params.catalog.path)
        stages = [f"retrain@round{k}", f"evaluate@round{k}"] + (["evaluate_base"] if k == 0 else [])
        done.append(version_task.fn(params, T.Layout(root), k, stages, True, False))
    return root, params, done, r1


def test_metrics_diff_shows_the_evaluation_metrics_and_only_them(two_versions):
    root, _, done, r1 = two_versions
    assert [d["tag"] for d in done] == ["round-0", "round-1"]
    assert "data/round1/evaluate/metrics.json" in done[1]["git_files"]
    proc = V.dvc(["metrics", "diff", "round-0", "round-1", "--all", "--json"], root)
    diff = json.loads(proc.stdout)
    assert set(diff) == {"data/round0/evaluate_base/metrics.json", "data/round0/evaluate/metrics.json",
                         "data/round1/evaluate/metrics.json"}
    new = diff["data/round1/evaluate/metrics.json"]
    assert new["retrieval.r1_mean"]["old"] is None and new["retrieval.r1_mean"]["new"] == r1[1]["evaluate"]
    assert diff["data/round0/evaluate/metrics.json"]["retrieval.r1_mean"] == {"old": r1[0]["evaluate"],
                                                                            "new": r1[0]["evaluate"], "diff": 0.0}
    # the one warning: round-0 has no round 1 evaluation yet (dvc.yaml names it in every revision)
    assert "round-1" not in proc.stderr
    shown = json.loads(V.dvc(["metrics", "show", "--json"], root).stdout)
    assert all("stats.json" not in path for rev in shown.values() for path in rev.get("data", {}))


def test_plots_diff_draws_each_training_loss_against_step(two_versions):
    root = two_versions[0]
    out = json.loads(V.dvc(["plots", "diff", "round-0", "round-1", "--json"], root).stdout)
    # the only files missing are round 1's, in round-0 (dvc.yaml names them in every revision)
    assert {(e["rev"], e["source"].split("/")[1]) for e in out["errors"]} == {("round-0", "round1")}
    data = out["data"]
    for stage in ("round0/pretrain", "round0/finetune_captioner", "round0/retrain", "round1/finetune_filter",
                  "round1/retrain"):
        assert f"data/{stage}/loss.csv" in data, sorted(data)
    # the per-stage plot draws y=loss against x=step, read from the tag's git tree
    content = data["data/round1/retrain/loss.csv"][0]["content"]
    assert content["encoding"]["x"]["field"] == "step" and content["layer"][0]["encoding"]["y"]["field"] == "loss"
    rows = [r for r in content["data"]["values"] if r["rev"] == "round-1"]
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and abs(float(rows[0]["loss"]) - 2.4) < 1e-6
    by_round = data["retrain_loss_by_round"][0]["content"]["data"]["values"]
    assert {(r["rev"], r["filename"]) for r in by_round} == {
        ("round-0", "round0/retrain/loss.csv"), ("round-1", "round0/retrain/loss.csv"),
        ("round-1", "round1/retrain/loss.csv")}


def test_committed_stages_are_clean_and_the_catalog_has_the_tags_revisions(two_versions):
    root, params, done, _ = two_versions
    assert V.dvc_status(root, ["retrain@round1", "evaluate@round1", "evaluate_base"]) == {}
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert "data/round1/retrain/stats.json" in [o["path"] for o in lock["retrain@round1"]["outs"]]
    # nothing the rounds wrote shows up in git besides what was committed
    assert V.git(["status", "--porcelain", "--untracked-files=all"], root).stdout == ""
    versions = {v["name"]: v for v in catalog.list_versions(root / params.catalog.path)}
    for k in (0, 1):
        assert versions[f"round{k}"]["git_rev"] == done[k]["commit"] == done[k]["catalog_revision"]
    con = catalog.connect(root / params.catalog.path, read_only=True)
    try:
        hashes = json.loads(con.execute("SELECT dvc_hashes FROM versions WHERE name = 'round1'").fetchone()[0])
    finally:
        con.close()
    assert hashes["retrain@round1"]["data/round1/retrain/model"] == V.dvc_lock_hashes(root)["retrain@round1"][
        "data/round1/retrain/model"]


@pytest.mark.parametrize("exp, want", [
    (None, "round0"), ("", "round0"), ("sweep-07", "round0+sweep-07"), ("bushy_tray", "round0+bushy_tray"),
    ("my exp/v1.2", "round0+my-exp-v1-2"), ("..", "round0+exp"), ("x" * 200, "round0+" + "x" * 121),
])
def test_experiment_version_name_rule(exp, want):
    assert catalog.experiment_version_name("round0", exp) == want
    assert catalog.version_name("round0", {} if exp is None else {"DVC_EXP_NAME": exp}) == want
    catalog.check_version_name(want)


HELLO_RECORD = """
stages:
  record:
    cmd: >-
      {python} -m vlp_core.cli record --name round0 --round 0 --metrics metrics.json
      --catalog cat.duckdb --marker record.json
    deps:
      - metrics.json
    params:
      - capfilt.itm_threshold
    outs:
      - record.json:
          cache: false
"""


def test_exp_run_records_under_the_experiment_name(tmp_path, monkeypatch):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "dvc.yaml").write_text(HELLO_RECORD.format(python=sys.executable))
    (root / "params.yaml").write_text(yaml.safe_dump(Params().to_dict()))
    write_json({"retrieval": {"r1_mean": 0.3}}, root / "metrics.json")
    (root / ".gitignore").write_text("*.duckdb\n*.duckdb.wal\n")
    V.git(["init", "-q"], root)
    V.dvc(["init", "-q"], root)
    V.git(["add", "."], root)
    V.git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], root)
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    V.dvc(["exp", "run", "--name", "sweep-07", "-S", "capfilt.itm_threshold=0.7"], root)
    names = [v["name"] for v in catalog.list_versions(root / "cat.duckdb")]
    assert names == ["round0+sweep-07"]
    assert json.loads((root / "record.json").read_text())["name"] == "round0+sweep-07"
    assert "sweep-07" in V.dvc(["exp", "show", "--json"], root).stdout


def test_the_readme_dvc_examples_run_as_written(two_versions):
    """README.md's "DVC across versions" commands, exactly as written, in the tagged repo."""
    import subprocess

    from readme_blocks import readme_command

    root = two_versions[0]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}

    def run(cmd: list[str]) -> str:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr[-2000:]}"
        return proc.stdout

    shown = run(readme_command("dvc metrics diff round-0 round-1"))
    assert "data/round1/evaluate/metrics.json" in shown and "retrieval.r1_mean" in shown
    run(readme_command("dvc plots diff round-0 round-1"))
    assert "round1/retrain/loss.csv" in (root / "dvc_plots" / "index.html").read_text()
    table = run(readme_command("dvc exp show --drop"))
    assert "retrieval.r1_mean" in table and "Experiment" in table
