"""One layout: ``dvc.yaml``, :class:`vlp_core.layout.Layout` and the round composer
(:mod:`vlp_core.rounds`) name the same paths for every stage."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vlp_core.config import Params
from vlp_core.layout import Layout, dvc_stage_name
from vlp_core.rounds import compose

REPO = Path(__file__).resolve().parent.parent


def _expand(value, key: str, item: dict):
    if isinstance(value, str):
        value = value.replace("${key}", key)
        return re.sub(r"\$\{item\.(\w+)\}", lambda m: str(item[m.group(1)]), value)
    if isinstance(value, list):
        return [_expand(v, key, item) for v in value]
    if isinstance(value, dict):
        return {_expand(k, key, item): _expand(v, key, item) for k, v in value.items()}
    return value


def dvc_stages() -> dict[str, dict]:
    """dvc.yaml's stages with ``foreach`` expanded (``capfilt@round1``)."""
    out = {}
    for name, body in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        if "foreach" in body:
            for key, item in body["foreach"].items():
                out[f"{name}@{key}"] = _expand(body["do"], key, item)
        else:
            out[name] = body
    return out


def _paths(entries) -> set[Path]:
    return {Path(next(iter(e)) if isinstance(e, dict) else e) for e in entries or []}


def _split(name: str) -> tuple[str, int | None]:
    base, _, key = name.partition("@")
    if key:
        return base, int(key[len("round"):])
    return base, (0 if base in ("pretrain", "evaluate_base") else None)


def test_every_dvc_stage_writes_what_the_layout_says():
    layout = Layout(Path("."))
    stages = dvc_stages()
    assert stages, "dvc.yaml has no stages"
    for name, body in stages.items():
        base, round = _split(name)
        declared = _paths(body.get("outs")) | _paths(body.get("metrics")) | _paths(body.get("plots"))
        assert declared == layout.outputs(base, round), name
        # only evaluation results are DVC metrics; the training loss logs are the per-stage plots
        assert _paths(body.get("metrics")) == layout.metrics(base, round), name
        assert _paths(body.get("plots")) == layout.plots(base, round), name
        for plot in body.get("plots") or []:
            assert next(iter(plot.values())) == {"cache": False, "x": "step", "y": "loss"}, name
        if base.startswith("finetune_") or base == "retrain":  # trains from the round's base model
            assert layout.base_model(round) in _paths(body["deps"]), name
            assert str(layout.base_model(round)) in body["cmd"], name


@pytest.mark.parametrize("round", [0, 1])
def test_the_round_composer_writes_where_dvc_yaml_says(round, tmp_path):
    """Every step the flows, the demo and the comparison run is a dvc.yaml stage, writing to its
    ``--out`` folder."""
    stages = dvc_stages()
    layout = Layout(Path("."))
    if round:  # round 1 needs round 0's retrained model
        (tmp_path / layout.base_model(1)).mkdir(parents=True)
        layout = Layout(tmp_path)
    steps = compose(Params(), layout, round)
    assert [s.name for s in steps if not s.given][:3] == ["ingest_web", "ingest_human", "ingest_test"]
    for step in steps:
        if step.given or not step.in_dvc:  # the gate's verdict is no DVC output
            continue
        assert step.dvc_name == dvc_stage_name(step.name, step.round) and step.dvc_name in stages, step.id
        out = Path(step.out_dir).relative_to(layout.root) if layout.root != Path(".") else Path(step.out_dir)
        cmd = stages[step.dvc_name]["cmd"]
        if step.name == "record":
            assert f"--marker {out / 'record.json'}" in cmd
        else:
            assert f"--out {out}" in " ".join(cmd.split()), (step.id, cmd)
    names = [s.name for s in steps if not s.given]
    assert names[-2:] == ["gate", "record"] and ("evaluate_base" in names) == (round == 0)


def test_every_step_calls_its_stage_function_with_its_own_out_dir(monkeypatch, tmp_path):
    """The composer's calls write to the step's folder (a closure bound to a later step's folder
    would write one stage's files into another's), and each is given the layout's root (the work
    dir its shard references are relative to: never the process's current folder)."""
    import vlp_core.capfilt.stage as cs
    import vlp_core.features.stage as fs
    import vlp_core.ingest.stage as ist
    import vlp_core.train.evaluate as ev
    import vlp_core.train.loop as lp

    seen: dict[str, Path] = {}
    roots: dict[str, Path] = {}

    def saw(name: str, out, root) -> Path:
        roots[name] = Path(root)
        return seen.setdefault(name, Path(out))

    monkeypatch.setattr(ist, "run_ingest", lambda p, urls, out, root: saw(f"ingest:{out}", out, root))
    monkeypatch.setattr(lp, "run_pretrain", lambda p, s, out, fresh, root: saw("pretrain", out, root))
    monkeypatch.setattr(lp, "run_finetune", lambda p, t, s, init, out, fresh, root: saw(t, out, root))
    monkeypatch.setattr(lp, "in_fresh_process", lambda fn, p, s, base, out, fresh, root: saw("retrain", out, root))
    monkeypatch.setattr(cs, "run_capfilt", lambda p, m, c, f, out, round, calibration, root: saw("capfilt", out, root))
    monkeypatch.setattr(fs, "run_features", lambda p, corpus, model, out, root: saw("features", out, root))
    monkeypatch.setattr(ev, "run_evaluate", lambda p, model, test, out, ground_truth, root: saw(
        f"evaluate:{Path(model).parent.name}", out, root))
    layout = Layout(tmp_path)
    steps = compose(Params(), layout, 0, record=False)
    assert "gate" not in [s.name for s in steps]
    for step in steps:
        step.call(fresh=False) if step.trains else step.call()
    want = {"pretrain": layout.stage(0, "pretrain"), "captioner": layout.stage(0, "finetune_captioner"),
            "filter": layout.stage(0, "finetune_filter"), "capfilt": layout.stage(0, "capfilt"),
            "features": layout.stage(0, "features"), "retrain": layout.stage(0, "retrain"),
            "evaluate:retrain": layout.stage(0, "evaluate"), "evaluate:pretrain": layout.stage(0, "evaluate_base")}
    assert {k: v for k, v in seen.items() if not k.startswith("ingest:")} == want
    assert {v for k, v in seen.items() if k.startswith("ingest:")} == {layout.ingest(s) for s in ("web", "human", "test")}
    assert {Path(s.out_dir) for s in steps} >= set(want.values())
    assert len(roots) == len(seen) and set(roots.values()) == {layout.root}
