"""The quality gate through the real flow, on both paths, in a git + DVC repo at tiny sizes:
round 0 is rejected (a margin no round can pass), then re-gated as promoted (a margin every
round passes).  The rejected round is recorded with its reason but gets no tag, and neither the
next round nor the nightly starts from it; promoted, it gets all three.  The gate's settings are
not tracked by dvc.lock, so ``-S gate.*`` overrides still let a round be committed and tagged."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from flows import tasks as T
from vlp_core import versioning as V

REPO = Path(__file__).resolve().parent.parent
PASS_ALL, PASS_NONE = "gate.margin=-1e9", "gate.margin=1e9"


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture()
def fast_repo(tmp_path, tiny_world, world_server):
    """A git + DVC repo with this project's dvc.yaml, tiny sizes and step budgets, and URL lists."""
    from test_flows_cycle import _params_yaml  # the same tiny budgets as the end-to-end test

    from vlp_core.synthetic.server import write_url_list

    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "vlp_core", root / "vlp_core", ignore=shutil.ignore_patterns("__pycache__"))
    _params_yaml(root / "params.yaml", {"gate.enabled": True})  # the end-to-end test turns it off
    shutil.copytree(tiny_world, root / "data" / "world")  # an input of dvc.yaml's evaluate stages
    (root / ".gitignore").write_text("/data/\n__pycache__/\n")
    for split in T.SPLITS:
        write_url_list(tiny_world, split, world_server.base_url, root / "data" / "urls" / f"{split}.parquet")
    V.git(["init", "-q"], root)
    V.dvc(["init", "-q"], root)
    V.git(["add", "."], root)
    V.git(["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init"], root)
    return root


@pytest.mark.slow
def test_a_rejected_round_is_recorded_untagged_and_never_a_source(harness, fast_repo):
    """One real round (the rest are cache hits): rejected, then re-gated as promoted."""
    from vlp_core import promotion as G
    from flows.bootstrap import bootstrap_flow
    from flows.cycles import nightly_flow
    from vlp_core.catalog import list_versions

    root, layout = fast_repo, T.Layout(fast_repo)
    cat = root / "data" / "catalog.duckdb"
    r0 = bootstrap_flow(workdir=str(root), round=0, overrides=(PASS_NONE,))
    assert (r0["gate"]["state"], r0["gate"]["parent"]) == ("rejected", "baseline")  # vs the pretrained model
    assert "does not beat its parent" in r0["gate"]["reason"]
    # recorded with the reason; no tag, no promotion
    assert r0["record"]["skipped"] is False and r0["version"]["tag"] is None and not r0["version"]["promoted"]
    assert V.git(["tag"], root).stdout.split() == []
    assert [(d["name"], d["state"], d["state_reason"], d["parent"]) for d in list_versions(cat)] == [
        ("round0", "rejected", r0["gate"]["reason"], "baseline")]
    assert "record@round0" in r0["version"]["dvc_committed"]  # its stages ran: dvc.lock says so
    # the next round starts from the pretrained baseline, not the rejected round's model ...
    r1 = bootstrap_flow(workdir=str(root), round=1, until="pretrain")
    assert root / r1["pretrain"]["out_dir"] == layout.stage(0, "pretrain")  # the base step: that model's folder
    # ... and the nightly has no promoted round's captioner and filter to use: ingest only
    assert "capfilt" not in nightly_flow(workdir=str(root))

    # a gate every round passes: only the verdict changes, so only record re-runs, and the
    # promotion's side effects follow -- the tag, the state, the next round's and the nightly's source
    again = bootstrap_flow(workdir=str(root), round=0, overrides=(PASS_ALL,))
    ran = [n for n, v in again.items() if isinstance(v, dict) and v.get("skipped") is False]
    assert ran == ["gate", "record"], ran
    assert again["version"]["tag"] == "round-0" and again["version"]["promoted"]
    assert V.git(["tag"], root).stdout.split() == ["round-0"]
    assert [(d["name"], d["state"]) for d in list_versions(cat)] == [("round0", "promoted")]
    assert "beats its parent" in list_versions(cat)[0]["state_reason"]
    r1 = bootstrap_flow(workdir=str(root), round=1, until="pretrain")
    assert root / r1["pretrain"]["out_dir"] == layout.stage(0, "retrain") and G.parent_round(layout, 1) == 0
    nightly = nightly_flow(workdir=str(root))
    assert nightly["capfilt"]["round"] == 0 and nightly["capfilt"]["out_dir"] == str(Path("data/round0/capfilt"))
