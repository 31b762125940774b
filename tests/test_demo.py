"""The demo's own pieces: its settings laid over params.yaml, its own git + DVC repo, and the
``retrain.init: continue`` mode its comparison uses (every arm continues round 0's model)."""
from __future__ import annotations

import os
from pathlib import Path

import yaml

from fixtures_world import tiny_params
from flows.demo import DEMO_SETTINGS, PROJECT, demo_params_text, prepare_demo_repo
from vlp_core import versioning as V
from vlp_core.config import load_params


def test_demo_settings_are_laid_over_the_platform_params(tmp_path):
    base = yaml.safe_load((PROJECT / "params.yaml").read_text())
    demo = yaml.safe_load(DEMO_SETTINGS.read_text())
    (tmp_path / "params.yaml").write_text(demo_params_text())
    p = load_params(tmp_path / "params.yaml")
    # the demo's own sizes and budgets ...
    assert p.synthetic.objects == demo["synthetic"]["objects"] == 1
    assert p.retrain.init == "continue" and p.pretrain.steps == demo["pretrain"]["steps"]
    # ... and everything else as the platform's params.yaml says
    assert p.ingest.thread_count == base["ingest"]["thread_count"]
    assert p.capfilt.prompt == base["capfilt"]["prompt"]
    # the platform's params.yaml is not the demo's: it keeps BLIP's from-scratch retrain
    assert load_params(PROJECT / "params.yaml").retrain.init == "scratch"


def test_prepare_demo_repo_makes_its_own_git_dvc_repo_once(tmp_path):
    root = prepare_demo_repo(tmp_path / "demo")
    assert (root / ".git").is_dir() and V.is_dvc_repo(root)
    assert (root / "dvc.yaml").read_text() == (PROJECT / "dvc.yaml").read_text()
    assert (root / "vlp_core").resolve() == (PROJECT / "vlp_core").resolve()  # the stages' code deps
    assert load_params(root / "params.yaml").synthetic.objects == 1
    head = V.git(["rev-parse", "HEAD"], root).stdout.strip()
    # a second call changes nothing, and keeps a params.yaml the user edited
    edited = (root / "params.yaml").read_text().replace("n_web: 5000", "n_web: 500")
    (root / "params.yaml").write_text(edited)
    prepare_demo_repo(root)
    assert (root / "params.yaml").read_text() == edited
    assert V.git(["rev-parse", "HEAD"], root).stdout.strip() == head
    assert V.git(["status", "--porcelain", "--", "dvc.yaml", ".gitignore"], root).stdout == ""
    # an older demo's params.yaml loses the replaced network switch and keeps the rest
    old = edited.replace("ingest:\n", "ingest:\n  allow_private_network: false\n", 1)
    assert old != edited
    (root / "params.yaml").write_text(old)
    prepare_demo_repo(root)
    assert (root / "params.yaml").read_text() == edited
    assert load_params(root / "params.yaml").synthetic.n_web == 500
    # an older demo's .gitignore (it hid the metrics and loss logs DVC reads from git) is replaced;
    # one the user wrote is kept
    from flows.demo import DEMO_GITIGNORE, OLD_DEMO_GITIGNORES

    (root / ".gitignore").write_text(OLD_DEMO_GITIGNORES[0])
    prepare_demo_repo(root)
    assert (root / ".gitignore").read_text() == DEMO_GITIGNORE
    (root / ".gitignore").write_text("/data/\n")
    prepare_demo_repo(root)
    assert (root / ".gitignore").read_text() == "/data/\n"


def test_retrain_continue_starts_from_the_base_model(tiny_world, tmp_path):
    from vlp_core.models import BlipMED
    from vlp_core.train.loop import run_pretrain, run_retrain
    from vlp_core.train.loop import state_sha256

    fast = {"pretrain.steps": 4, "pretrain.batch_size": 8, "pretrain.warmup_steps": 1, "pretrain.log_every": 1,
            "pretrain.checkpoint_every": 100, "model.vocab_size": 128}
    web = [(str(tiny_world / "web.parquet"), "web")]
    params = tiny_params(**fast)
    run_pretrain(params, web, tmp_path / "base")
    base = tmp_path / "base" / "model"
    cont = params.replace(**{"retrain.init": "continue", "retrain.steps": 3, "retrain.warmup_steps": 1})
    stats = run_retrain(cont, [(str(tiny_world / "human.parquet"), "human")], base, tmp_path / "cont")
    assert stats.extra["steps"] == 3 and stats.extra["fingerprint_inputs"]["model.init_from"] == os.path.normpath(base)
    a, b = BlipMED.from_pretrained(base), BlipMED.from_pretrained(tmp_path / "cont" / "model")
    assert a.tokenizer.get_vocab() == b.tokenizer.get_vocab()  # the base model's tokenizer, trained on
    assert state_sha256(a) != state_sha256(b)
    # the same in a spawned child process (how the flows and the comparison run retrains)
    from vlp_core.train.loop import in_fresh_process

    child = in_fresh_process(run_retrain, cont, [(str(tiny_world / "human.parquet"), "human")], base,
                             tmp_path / "child")
    assert child.extra["rank_state_sha256"] == stats.extra["rank_state_sha256"]  # bit-identical to in-process
    # scratch (BLIP's recipe): a fresh model for pretrain.steps, whatever the base
    stats = run_retrain(params, [(str(tiny_world / "human.parquet"), "human")], base, tmp_path / "scratch")
    assert stats.extra["steps"] == 4 and "model.arch" in stats.extra["fingerprint_inputs"]
