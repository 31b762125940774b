"""Versions: the project's dvc.yaml is valid and complete; after a round, the stages a flow
ran are committed to dvc.lock, dvc.lock is committed and tagged round-N, and pushed to the
default local-directory remote; `dvc exp run -S` works on params.yaml (sweeps)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

from flows import tasks as T
from flows.bootstrap import version_task
from vlp_core import versioning as V
from vlp_core.config import Params

REPO = Path(__file__).resolve().parent.parent

HELLO = """
stages:
  hello:
    cmd: python -c "import yaml; p = yaml.safe_load(open('params.yaml')); open('out.txt', 'w').write(str(p['capfilt']['itm_threshold']))"
    params:
      - capfilt.itm_threshold
    outs:
      - out.txt
"""


def test_project_dvc_yaml_lists_every_step_with_its_params():
    names = V.dvc_stage_names(REPO)
    for step in ("synthetic", "ingest_web", "ingest_human", "ingest_test", "pretrain"):
        assert step in names
    for step in ("finetune_captioner", "finetune_filter", "capfilt", "features", "retrain", "evaluate", "record"):
        assert f"{step}@round0" in names and f"{step}@round1" in names
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    plain = Params().to_dict()
    for name, body in stages.items():
        body = body.get("do", body)
        assert body["cmd"].startswith("vlp "), name
        for key in body.get("params", []):  # every listed key exists in params.yaml
            cur = plain
            for part in key.split("."):
                assert part in cur, f"{name}: params key {key} unknown"
                cur = cur[part]
    # the flow's DVC names are the pipeline's
    assert T.dvc_stage_name("capfilt", 1) == "capfilt@round1" and T.dvc_stage_name("pretrain", 0) == "pretrain"


@pytest.fixture()
def hello_repo(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "dvc.yaml").write_text(HELLO)
    (root / "params.yaml").write_text(yaml.safe_dump(Params().to_dict()))
    V.git(["init", "-q"], root)
    V.dvc(["init", "-q"], root)
    V.git(["add", "."], root)
    V.git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], root)
    return root


def test_round_is_committed_tagged_and_pushed(hello_repo, tmp_path):
    root = hello_repo
    (root / "out.txt").write_text("0.5")  # the stage ran outside dvc repro (as in a Prefect task)
    assert "hello" in V.dvc_status(root)
    params = Params().replace(**{"orchestration.dvc_push": True,
                                 "orchestration.dvc_remote_url": str(tmp_path / "remote")})
    done = version_task.fn(params, T.Layout(root), 3, ["hello", "not-a-stage"], True, False)
    assert done["dvc_committed"] == ["hello"] and done["tag"] == "round-3" and done["pushed"]
    assert V.dvc_status(root) == {}
    assert V.git(["tag", "--points-at", "HEAD"], root).stdout.split() == ["round-3"]
    assert "dvc.lock" in V.git(["show", "--name-only", "--format=", "HEAD"], root).stdout
    assert V.git_rev(root) == done["commit"]
    pushed = [p for p in (tmp_path / "remote").rglob("*") if p.is_file()]
    assert len(pushed) == 1 and pushed[0].read_text() == "0.5"
    assert V.dvc_lock_hashes(root)["hello"]["out.txt"]
    # overridden settings are never recorded
    assert version_task.fn(params, T.Layout(root), 4, ["hello"], True, True)["dvc_committed"] == []


def test_exp_run_sweeps_a_threshold(hello_repo):
    root = hello_repo
    env_path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ["PATH"], old = env_path, os.environ.get("PATH", "")
    try:
        V.dvc(["exp", "run", "-S", "capfilt.itm_threshold=0.7"], root)
    finally:
        os.environ["PATH"] = old
    assert (root / "out.txt").read_text() == "0.7"
    assert yaml.safe_load((root / "params.yaml").read_text())["capfilt"]["itm_threshold"] == 0.7
    shown = V.dvc(["exp", "show", "--json"], root).stdout
    assert "0.7" in shown


def test_versioning_errors_are_clear(tmp_path):
    with pytest.raises(V.VersioningError, match=r"dvc commit failed in .*`"):
        V.dvc_commit(tmp_path, ["nope"])
    assert V.git_rev(tmp_path) is None and V.dvc_lock_hashes(tmp_path) == {}
