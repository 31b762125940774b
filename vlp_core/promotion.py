"""Promotion: judge a round before any side effect, and find the model the next round (and
the nightly) starts from.  Plain Python on a work dir (:class:`vlp_core.layout.Layout`); the
rule itself is :mod:`vlp_core.gate`'s, and the round composer (:mod:`vlp_core.rounds`) runs
:func:`judge_round` as the round's ``gate`` step.

* :func:`judge_round` -- after ``evaluate``, before ``record`` and the tag: compares the round's
  ``evaluate/metrics.json`` with its parent's (:func:`vlp_core.gate.decide`) and writes the
  verdict to ``data/round<k>/gate.json``.  ``record`` stores it in the catalog (state and
  reason) and ``version`` tags ``round-N`` only for a promoted round, so a rejection leaves
  nothing to undo.
* :func:`parent_round` -- the latest promoted round before round k (None: the baseline).
* :func:`source_model` -- the model round k fine-tunes its captioner and filter from (and, with
  ``retrain.init: continue``, trains on): the latest promoted round's retrained model, else
  round 0's pretrained model (or the imported checkpoint it started from).
* :func:`latest_promoted_round` -- the round whose captioner and filter the nightly uses.
* :func:`dvc_held_stages` -- a round that started off dvc.yaml's chain (round k-1 was rejected)
  is not recorded in dvc.lock, which would name the wrong dependency.

A round's state is its ``gate.json``; a round recorded before the gate existed (``record.json``
and no ``gate.json``, e.g. by ``dvc repro``) counts as promoted, as every recorded round was then.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vlp_core.config import Params
from vlp_core.gate import PROMOTED, GateError, decide
from vlp_core.io import read_json, write_json
from vlp_core.layout import METRICS_FILE, PRETRAIN, Layout
from vlp_core.stagecache import StageInputError

BASELINE = "baseline"  # the parent's name when it is round 0's pretrained model (evaluate_base)


def gate_file(layout: Layout, round: int) -> Path:
    return layout.gate_file(round)


def round_state(layout: Layout, round: int) -> Optional[str]:
    """``promoted`` / ``rejected`` from the round's gate.json; ``promoted`` for a round recorded
    without one (before the gate); None for a round not finished."""
    f = gate_file(layout, round)
    if f.exists():
        try:
            return str(read_json(f)["state"])
        except (OSError, ValueError, KeyError, TypeError):
            raise StageInputError(f"{f}: not a gate verdict (delete it and rerun the round)") from None
    return PROMOTED if layout.record_marker(round).exists() else None


def parent_round(layout: Layout, round: int) -> Optional[int]:
    """The latest promoted round before ``round``, or None (its parent is then the baseline)."""
    return next((j for j in range(round - 1, -1, -1) if round_state(layout, j) == PROMOTED), None)


def parent_metrics(layout: Layout, round: int) -> tuple[str, Optional[Path]]:
    """The parent's name and its metrics.json (None when it has no evaluation): round k's
    :func:`parent_round`, else round 0's pretrained baseline (``evaluate_base``)."""
    j = parent_round(layout, round)
    name, path = (BASELINE, layout.stage(0, "evaluate_base") / METRICS_FILE) if j is None else \
        (f"round{j}", layout.stage(j, "evaluate") / METRICS_FILE)
    return name, (path if path.exists() else None)


def source_model(layout: Layout, round: int, init_from: Optional[str] = None) -> Path:
    """The model round ``round`` (> 0) starts from: the latest promoted round's retrained model,
    else round 0's pretrained model, else ``init_from`` (round 0's imported checkpoint)."""
    j = parent_round(layout, round)
    if j is not None:
        prev = layout.model(j, "retrain")
        if not prev.exists():
            raise StageInputError(f"{prev}: round {round} starts from round {j} (the latest promoted), "
                                   f"whose retrained model is missing")
        return prev
    for cand in (layout.model(0, PRETRAIN), Path(init_from) if init_from else None):
        if cand is not None and cand.exists():
            return cand
    raise StageInputError(f"round {round}: no promoted round before it, and no baseline to start from "
                           f"({layout.model(0, 'pretrain')} missing; pass round 0's --init-from checkpoint)")


def dvc_source(layout: Layout, round: int) -> Path:
    """The model dvc.yaml's items say round ``round`` starts from (round k-1's retrained one)."""
    return layout.model(0, PRETRAIN) if round == 0 else layout.model(round - 1, "retrain")


def dvc_held_stages(layout: Layout, round: int, base_model: Optional[str], stages: Sequence[str]) -> list[str]:
    """The round's own DVC stages (``<stage>@round<k>``) when it started from another model than
    :func:`dvc_source` (a rejected round before it): dvc.lock would record the wrong dependency
    for them, so they are not committed (``dvc status`` then shows them as changed)."""
    if round == 0 or base_model is None or Path(base_model) == dvc_source(layout, round):
        return []
    return [s for s in stages if s.endswith(f"@round{round}")]


def latest_promoted_round(layout: Layout, usable: Callable[[int], bool] = lambda k: True) -> Optional[int]:
    """The latest promoted round for which ``usable(k)`` holds (the nightly: it has a captioner
    and a filter), or None."""
    rounds = sorted((int(p.name[5:]) for p in layout.data.glob("round*") if p.name[5:].isdigit()), reverse=True)
    return next((k for k in rounds if usable(k) and round_state(layout, k) == PROMOTED), None)


def judge_round(params: Params, layout: Layout, round: int) -> dict[str, Any]:
    """Judge round ``round`` (its evaluation against its parent's) and write ``gate.json``.
    Returns a stage-like dict: ``key`` (the verdict's digest, so ``record`` re-runs when the
    verdict changes), ``skipped`` (the same verdict was already on disk), ``promoted``,
    ``state``, ``reason``, ``parent``."""
    child_file = layout.stage(round, "evaluate") / METRICS_FILE
    if not child_file.exists():
        raise StageInputError(f"{child_file}: round {round} has no evaluation to gate")
    parent_name, parent_file = parent_metrics(layout, round)
    child = _metrics(child_file)
    parent = _metrics(parent_file) if parent_file is not None else None
    try:
        verdict = decide(child, parent, params.gate, parent_name=parent_name).to_dict()
    except GateError as exc:  # it names the metric; say which file was judged
        raise GateError(f"{child_file}: {exc}") from None
    verdict = {"round": round, **verdict, "parent_metrics": str(parent_file) if parent_file else None}
    key = hashlib.sha256(json.dumps(verdict, sort_keys=True).encode()).hexdigest()
    out = gate_file(layout, round)
    same = out.exists() and _metrics(out) == verdict
    if not same:
        write_json(verdict, out)
    return {"name": "gate", "round": round, "key": key, "out_dir": str(out.parent), "skipped": same,
            "stats": {}, "promoted": verdict["state"] == PROMOTED, "state": verdict["state"],
            "reason": verdict["reason"], "parent": verdict["parent"]}


def _metrics(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise StageInputError(f"{path}: unreadable ({exc})") from None
    if not isinstance(data, dict):
        raise StageInputError(f"{path}: not a JSON object")
    return data


__all__ = ["BASELINE", "dvc_held_stages", "dvc_source", "gate_file", "judge_round", "latest_promoted_round",
           "parent_metrics", "parent_round", "round_state", "source_model"]
