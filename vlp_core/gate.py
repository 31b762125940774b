"""The quality gate: is a round good enough to be promoted?  One pure rule, no I/O.

``decide(child, parent, settings)`` compares the round's evaluation (``child``, the dict of
its ``metrics.json``) with its parent's on ``gate.metric``: the round is *promoted* when

    child - parent > gate.margin        (gate.higher_is_better; parent - child otherwise)

and *rejected* otherwise, always with a one-line reason that names the metric and both values.
The parent of round 0 is the pretrained baseline; of round k > 0 the latest promoted round
before it (the flows find it: ``vlp_core/promotion.py``).  With no parent evaluation (``parent`` is
None, or its value is not a number) ``gate.no_parent`` decides; with ``gate.enabled: false``
every round is promoted (and nothing is checked).  A round whose own value is missing, NaN or not a number is rejected
(a broken evaluation is never promoted); a metric name found in neither file is a bad setting
(:class:`GateError`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from vlp_core.config import GateParams
from vlp_core.errors import VlpError

PROMOTED = "promoted"
REJECTED = "rejected"
STATES = (PROMOTED, REJECTED)


class GateError(VlpError, ValueError):
    """The gate cannot judge: its metric is in neither evaluation (a bad ``gate.metric``)."""


@dataclass(frozen=True)
class GateDecision:
    """A round's verdict: ``state`` (promoted / rejected), why, and the numbers it rests on."""

    state: str
    reason: str
    metric: str
    value: Optional[float]  # the round's
    parent: Optional[str]  # the parent's name ("round0", "baseline"), None when there is none
    parent_value: Optional[float]
    margin: float

    @property
    def promoted(self) -> bool:
        return self.state == PROMOTED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def metric_value(metrics: Mapping[str, Any], name: str) -> tuple[bool, Optional[float]]:
    """``(found, value)`` of metric ``name`` (dotted for nested keys) in a metrics dict; value is
    None when the entry is not a finite number (``null``, NaN, text)."""
    cur: Any = metrics
    for part in name.split("."):
        if not isinstance(cur, Mapping) or part not in cur:
            return False, None
        cur = cur[part]
    if isinstance(cur, bool) or not isinstance(cur, (int, float)) or not math.isfinite(float(cur)):
        return True, None
    return True, float(cur)


def decide(child: Mapping[str, Any], parent: Optional[Mapping[str, Any]], settings: GateParams,
           parent_name: Optional[str] = None) -> GateDecision:
    """Promote or reject a round from its metrics (``child``) and its parent's (``parent``;
    None when there is no parent evaluation).  Raises :class:`GateError` when ``settings.metric``
    is in neither dict."""
    m = settings.metric
    found, value = metric_value(child, m)
    p_found, p_value = metric_value(parent, m) if parent is not None else (False, None)

    def verdict(promoted: bool, reason: str) -> GateDecision:
        return GateDecision(PROMOTED if promoted else REJECTED, reason, m, value,
                            parent_name if parent is not None else None, p_value, settings.margin)

    if not settings.enabled:
        return verdict(True, "the gate is off (gate.enabled: false)")
    if not found and not p_found:
        raise GateError(f"gate.metric {m!r}: not in the round's metrics.json "
                        f"(known: {', '.join(sorted(_numeric_keys(child))) or 'none'})")
    if value is None:
        what = "missing from" if not found else "not a number in"
        return verdict(False, f"{m} is {what} the round's evaluation")
    if parent is None or p_value is None:
        why = (f"no parent evaluation ({parent_name or 'none'})" if parent is None
               else f"the parent's ({parent_name}) {m} is {'missing' if not p_found else 'not a number'}")
        return verdict(settings.no_parent == "promote", f"{why}: {settings.no_parent} (gate.no_parent); "
                                                       f"{m}={value:.4f}")
    gain = (value - p_value) if settings.higher_is_better else (p_value - value)
    lower = "" if settings.higher_is_better else " (lower is better)"
    text = f"{m} {value:.4f} vs {p_value:.4f} ({parent_name}): gain {gain:+.4f}{lower}, margin {settings.margin:g}"
    if gain > settings.margin:
        return verdict(True, f"{text}: beats its parent")
    return verdict(False, f"{text}: does not beat its parent")


def _numeric_keys(metrics: Mapping[str, Any], prefix: str = "") -> list[str]:
    out: list[str] = []
    for k, v in metrics.items():
        if not prefix and k == "settings":
            continue
        if isinstance(v, Mapping):
            out += _numeric_keys(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(f"{prefix}{k}")
    return out


__all__ = ["GateDecision", "GateError", "PROMOTED", "REJECTED", "STATES", "decide", "metric_value"]
