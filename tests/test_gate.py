"""The quality gate: the rule (``vlp_core.gate.decide``) on both paths and at its edges, and
the flows' bookkeeping around it (``vlp_core/promotion.py``): which round is a round's parent, which
model the next round and the nightly start from, and which DVC stages are held back -- on
hand-made round folders, no training.  The full flow on both paths: tests/test_flows_gate.py."""
from __future__ import annotations

import math

import pytest

from vlp_core.config import GateParams, load_params
from vlp_core.gate import PROMOTED, REJECTED, GateError, decide, metric_value
from vlp_core.io import write_json

ON = GateParams()  # enabled, r1_mean, higher is better, margin 0, no parent -> promote


def test_a_round_that_beats_its_parent_is_promoted_and_one_that_does_not_is_rejected():
    up = decide({"r1_mean": 42.0}, {"r1_mean": 40.0}, ON, parent_name="round0")
    assert up.promoted and up.state == PROMOTED and (up.value, up.parent_value, up.parent) == (42.0, 40.0, "round0")
    assert "r1_mean 42.0000 vs 40.0000 (round0): gain +2.0000" in up.reason and "beats its parent" in up.reason
    down = decide({"r1_mean": 39.0}, {"r1_mean": 40.0}, ON, parent_name="baseline")
    assert not down.promoted and down.state == REJECTED
    assert "gain -1.0000" in down.reason and "does not beat its parent" in down.reason
    tie = decide({"r1_mean": 40.0}, {"r1_mean": 40.0}, ON, parent_name="round0")  # beating means gaining
    assert tie.state == REJECTED


def test_the_margin_and_the_direction():
    m2 = GateParams(margin=2.0)
    assert decide({"r1_mean": 42.5}, {"r1_mean": 40.0}, m2, "p").promoted
    assert not decide({"r1_mean": 42.0}, {"r1_mean": 40.0}, m2, "p").promoted  # +2 does not exceed 2
    tolerant = GateParams(margin=-1.0)  # a regression up to 1 point passes
    assert decide({"r1_mean": 39.5}, {"r1_mean": 40.0}, tolerant, "p").promoted
    assert not decide({"r1_mean": 38.5}, {"r1_mean": 40.0}, tolerant, "p").promoted
    loss = GateParams(metric="loss", higher_is_better=False)
    lower = decide({"loss": 0.8}, {"loss": 1.0}, loss, "p")
    assert lower.promoted and "gain +0.2000 (lower is better)" in lower.reason
    assert not decide({"loss": 1.2}, {"loss": 1.0}, loss, "p").promoted


def test_nested_metrics_and_metric_value():
    nested = GateParams(metric="retrieval.r1_mean")
    assert decide({"retrieval": {"r1_mean": 3}}, {"retrieval": {"r1_mean": 2}}, nested, "p").promoted
    assert metric_value({"a": {"b": 1}}, "a.b") == (True, 1.0)
    assert metric_value({"a": None}, "a") == (True, None)
    assert metric_value({"a": float("nan")}, "a") == (True, None)
    assert metric_value({"a": True}, "a") == (True, None)  # a flag is not a score
    assert metric_value({"a": 1}, "a.b") == (False, None)


def test_no_parent_evaluation_is_decided_by_the_setting():
    promote = decide({"r1_mean": 5.0}, None, ON, parent_name="baseline")
    assert promote.promoted and promote.parent is None and promote.parent_value is None
    assert "no parent evaluation (baseline): promote (gate.no_parent)" in promote.reason
    reject = decide({"r1_mean": 5.0}, None, GateParams(no_parent="reject"), parent_name="baseline")
    assert reject.state == REJECTED and "reject (gate.no_parent)" in reject.reason
    # a parent whose value is not a number counts as no parent
    nan_parent = decide({"r1_mean": 5.0}, {"r1_mean": None}, GateParams(no_parent="reject"), "round0")
    assert nan_parent.state == REJECTED and "the parent's (round0) r1_mean is not a number" in nan_parent.reason


def test_a_broken_evaluation_is_never_promoted_and_a_bad_metric_name_is_an_error():
    assert decide({"r1_mean": math.nan}, {"r1_mean": 1.0}, ON, "p").state == REJECTED
    missing = decide({"bleu4": 1.0}, {"r1_mean": 1.0}, ON, "p")
    assert missing.state == REJECTED and "r1_mean is missing from the round's evaluation" in missing.reason
    with pytest.raises(GateError, match=r"gate.metric 'r1_maen': not in the round's metrics.json \(known: bleu4, "
                                        r"retrieval.tr_r1\)"):
        decide({"bleu4": 1.0, "retrieval": {"tr_r1": 2}, "settings": {"k": 1}}, {"r1_mean": 1.0},
               GateParams(metric="r1_maen"), "p")
    off = decide({"bleu4": 1.0}, None, GateParams(enabled=False, metric="r1_maen"))  # off: nothing checked
    assert off.promoted and off.reason == "the gate is off (gate.enabled: false)"


def test_gate_settings_load_from_params_yaml():
    g = load_params("params.yaml").gate
    assert (g.enabled, g.metric, g.higher_is_better, g.margin, g.no_parent) == (True, "r1_mean", True, 0.0, "promote")
    g = load_params("params.yaml", ["gate.margin=-0.5", "gate.no_parent=reject", "gate.enabled=false"]).gate
    assert (g.margin, g.no_parent, g.enabled) == (-0.5, "reject", False)


# --------------------------------------------------------------------------- vlp_core/promotion.py
def _round(layout, k, state=None, r1=None, record=True, retrain=True):
    """A finished round's folder: evaluate/metrics.json, its retrained model, gate.json, record.json."""
    if r1 is not None:
        write_json({"r1_mean": r1}, layout.stage(k, "evaluate") / "metrics.json")
    if retrain:
        layout.model(k, "retrain").mkdir(parents=True, exist_ok=True)
        (layout.model(k, "retrain") / "config.json").write_text(f'{{"round": {k}}}')
    if state is not None:
        write_json({"state": state}, layout.data / f"round{k}" / "gate.json")
    if record:
        write_json({"name": f"round{k}"}, layout.record_marker(k))


def test_parent_round_and_source_model_skip_rejected_rounds(tmp_path):
    from vlp_core import promotion as G
    from flows import tasks as T

    layout = T.Layout(tmp_path)
    layout.model(0, "pretrain").mkdir(parents=True)
    write_json({"r1_mean": 1.0}, layout.stage(0, "evaluate_base") / "metrics.json")
    _round(layout, 0, PROMOTED, 3.0)
    _round(layout, 1, REJECTED, 2.0)
    _round(layout, 2, REJECTED, 2.5)
    assert [G.parent_round(layout, k) for k in (0, 1, 2, 3)] == [None, 0, 0, 0]
    assert G.source_model(layout, 3) == layout.model(0, "retrain")  # not round 2's, not round 1's
    assert G.parent_metrics(layout, 3) == ("round0", layout.stage(0, "evaluate") / "metrics.json")
    assert G.parent_metrics(layout, 0) == ("baseline", layout.stage(0, "evaluate_base") / "metrics.json")
    # round 2 started off dvc.yaml's chain (round 1's model): its own stages are held out of dvc.lock
    stages = ["ingest_web", "finetune_captioner@round2", "retrain@round2", "record@round2"]
    assert G.dvc_held_stages(layout, 2, str(G.source_model(layout, 2)), stages) == stages[1:]
    assert G.dvc_held_stages(layout, 1, str(G.source_model(layout, 1)), stages) == []
    # the nightly: the latest promoted round it can use
    assert G.latest_promoted_round(layout) == 0
    assert G.latest_promoted_round(layout, lambda k: k != 0) is None


def test_with_no_promoted_round_the_baseline_is_the_source(tmp_path):
    from vlp_core import promotion as G
    from flows import tasks as T

    layout = T.Layout(tmp_path)
    _round(layout, 0, REJECTED, 1.0)
    with pytest.raises(T.FlowStageError, match="no promoted round before it, and no baseline"):
        G.source_model(layout, 1)
    imported = tmp_path / "imported"
    imported.mkdir()
    assert G.source_model(layout, 1, str(imported)) == imported  # round 0's --init-from
    layout.model(0, "pretrain").mkdir(parents=True)
    assert G.source_model(layout, 1, str(imported)) == layout.model(0, "pretrain")
    assert G.parent_metrics(layout, 1) == ("baseline", None)  # no evaluate_base: no parent evaluation


def test_a_round_recorded_before_the_gate_counts_as_promoted(tmp_path):
    from vlp_core import promotion as G
    from flows import tasks as T

    layout = T.Layout(tmp_path)
    _round(layout, 0, None, 1.0)  # record.json, no gate.json (e.g. `dvc repro`)
    _round(layout, 1, None, 1.0, record=False)  # not finished
    assert (G.round_state(layout, 0), G.round_state(layout, 1)) == (PROMOTED, None)
    assert G.parent_round(layout, 2) == 0
    (layout.data / "round1" / "gate.json").write_text("[]")
    with pytest.raises(T.FlowStageError, match=r"gate.json: not a gate verdict"):
        G.round_state(layout, 1)


def test_gate_task_writes_the_verdict_once(tmp_path):
    from vlp_core import promotion as G
    from flows import tasks as T
    from vlp_core.config import Params

    layout = T.Layout(tmp_path)
    write_json({"r1_mean": 10.0}, layout.stage(0, "evaluate_base") / "metrics.json")
    write_json({"r1_mean": 12.0}, layout.stage(0, "evaluate") / "metrics.json")
    first = G.judge_round(Params(), layout, 0)
    assert (first["state"], first["parent"], first["skipped"]) == (PROMOTED, "baseline", False)
    again = G.judge_round(Params(), layout, 0)
    assert again["skipped"] and again["key"] == first["key"]
    strict = G.judge_round(Params().replace(**{"gate.margin": 5.0}), layout, 0)  # a new verdict, a new key
    assert (strict["state"], strict["skipped"]) == (REJECTED, False) and strict["key"] != first["key"]
    assert G.round_state(layout, 0) == REJECTED
    with pytest.raises(GateError, match=r"evaluate/metrics.json: gate.metric 'nope'"):
        G.judge_round(Params().replace(**{"gate.metric": "nope"}), layout, 0)
    with pytest.raises(T.FlowStageError, match="round 1 has no evaluation to gate"):
        G.judge_round(Params(), layout, 1)
