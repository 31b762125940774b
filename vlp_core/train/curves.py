"""When a training run learned: its ``loss.csv`` read back.

The ITM loss of a from-scratch run here sits on a plateau (about 0.37-0.46 with hard negatives
that reverse relations) while the model cannot tell a caption from the same caption with the
relation reversed, and then falls within a few hundred steps.  With a fixed step budget and a
cosine schedule, a run whose ITM loss falls late has little learning rate left after it.  In
seed 0 of issue 16's ``bench/cycle.py`` run, the oracle's ITM loss settled at step 2,260 and
round 1's filter-only control's, on a corpus 655 clean pairs smaller, at step 2,790 -- and the
two scored 86.2 and 74.0 R@1.  So the comparison table prints, for each model, when its ITM loss
settled and where its losses ended, beside the R@1 they may explain (one seed does not show
that they do).

:func:`itm_settled_step` is the first logged step from which the ITM loss, averaged over the
trailing ``window`` steps, stays below ``level`` to the end of the run (``None`` when the last
window is not below it).  :func:`loss_summary` adds the final ITC and ITM losses (the last
window's means).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Optional

ITM_SETTLED_LEVEL = 0.2  # between the plateau (>= 0.3) and a run that checks relations (<= 0.1)
SETTLE_WINDOW = 200  # steps averaged (loss.csv logs a mean every log_every steps)


def read_loss_log(path: str | Path) -> list[dict[str, float]]:
    """``loss.csv`` as rows of floats, by step.  Raises ``ValueError`` naming the file, row and
    field when a value is not a number."""
    path = Path(path)
    rows = []
    with path.open(newline="") as f:
        for i, r in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
            row = {}
            for k, v in r.items():
                try:
                    row[k] = float(v)
                except (TypeError, ValueError):
                    raise ValueError(f"{path}: row {i}, field {k!r}: {v!r} is not a number") from None
            rows.append(row)
    return sorted(rows, key=lambda r: r["step"])


def _trailing_means(rows: list[dict[str, float]], key: str, window: int) -> list[tuple[int, float]]:
    """(step, mean of ``key`` over the logged rows in (step - window, step])."""
    out, lo, total = [], 0, 0.0
    for hi, r in enumerate(rows):
        total += r[key]
        while rows[lo]["step"] <= r["step"] - window:
            total -= rows[lo][key]
            lo += 1
        out.append((int(r["step"]), total / (hi - lo + 1)))
    return out


def itm_settled_step(rows: list[dict[str, float]], level: float = ITM_SETTLED_LEVEL,
                     window: int = SETTLE_WINDOW) -> Optional[int]:
    """The first logged step from which every trailing ``window``-step mean of the ITM loss is
    below ``level``; ``None`` when the run ends above it (or logged no ITM loss)."""
    if not rows or "itm" not in rows[0]:
        return None
    settled = None
    for step, mean in _trailing_means(rows, "itm", window):
        if mean < level:
            settled = step if settled is None else settled
        else:
            settled = None
    return settled


def loss_summary(loss_csv: str | Path, level: float = ITM_SETTLED_LEVEL, window: int = SETTLE_WINDOW) -> dict[str, Any]:
    """What the comparison table prints for one model; ``{}`` when the run left no loss log (an
    imported checkpoint)."""
    p = Path(loss_csv)
    if not p.exists():
        return {}
    rows = read_loss_log(p)
    if not rows:
        return {}
    out: dict[str, Any] = {"steps": int(rows[-1]["step"]), "itm_settled_step": itm_settled_step(rows, level, window),
                           "itm_settled_level": level, "window": window}
    for key in ("itc", "itm"):
        if key in rows[0]:
            out[f"final_{key}"] = _trailing_means(rows, key, window)[-1][1]
    return out


__all__ = ["ITM_SETTLED_LEVEL", "SETTLE_WINDOW", "itm_settled_step", "loss_summary", "read_loss_log"]
