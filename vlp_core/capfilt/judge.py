"""CapFilt's decision, apart from its scores: the keep rule, once, vectorised.

The scoring pass (:mod:`vlp_core.capfilt.stage`) writes every candidate's ITC and ITM scores
and, where the candidate could not be scored, why (``image_decode_error: ...``, ``empty_text``,
``itc_prescreen``).  :func:`judge` then decides ``kept`` and ``reason`` from those columns and
a rule (the ITM threshold and ``keep_top``), and stores the threshold with every row.  It is
pure: the same scores and rule give the same decisions, so ``vlp capfilt rethreshold`` is this
function run again on a stored corpus, with no model.

The rule, per row:

* a row that could not be scored keeps its reason (never kept);
* ``itm <= threshold``: ``itm_below_threshold``;
* a synthetic caption above the threshold that is not among its image's ``keep_top`` highest
  ITM (ties to the lower candidate number): ``not_top_itm``;
* otherwise kept.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from vlp_core.schema import C

R_BELOW = "itm_below_threshold"
R_NOT_TOP = "not_top_itm"
R_PRESCREEN = "itc_prescreen"
R_EMPTY = "empty_text"
R_IMAGE = "image_decode_error"
JUDGED = (R_BELOW, R_NOT_TOP)  # reasons the rule gives (and takes back when it changes)


def decide(keys: np.ndarray, candidate: np.ndarray, synthetic: np.ndarray, itm: np.ndarray,
           prior: list[Optional[str]], threshold: float, keep_top: Optional[int]) -> tuple[np.ndarray, list[Optional[str]]]:
    """``(kept, reason)`` per row.  ``itm`` is NaN where unscored; ``prior`` holds each row's
    reason before judging (None, a reason of :data:`JUDGED`, or why it could not be scored)."""
    n = len(prior)
    judged = np.array([r is None or r in JUDGED for r in prior], dtype=bool)
    above = judged & (np.nan_to_num(itm.astype(np.float64), nan=-np.inf) > threshold)
    not_top = np.zeros(n, dtype=bool)
    if keep_top is not None:
        cand = np.flatnonzero(above & synthetic)
        if len(cand):
            # by image, then ITM descending, then candidate number; rank within each image
            order = cand[np.lexsort((candidate[cand], -itm[cand].astype(np.float64), keys[cand]))]
            grp = keys[order]
            starts = np.r_[True, grp[1:] != grp[:-1]]
            first = np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))
            rank = np.arange(len(order)) - first
            not_top[order[rank >= keep_top]] = True
    kept = above & ~not_top
    reason: list[Optional[str]] = [
        p if not j else (R_BELOW if not a else (R_NOT_TOP if t else None))
        for p, j, a, t in zip(prior, judged.tolist(), above.tolist(), not_top.tolist())]
    return kept, reason


def judge(table: pa.Table, threshold: float, keep_top: Optional[int] = None) -> pa.Table:
    """``table`` (CORPUS_SCHEMA columns) with ``kept``, ``reason`` and ``itm_threshold`` set by the rule."""
    keys = np.asarray(table[C.KEY].to_numpy(zero_copy_only=False)).astype(str)
    candidate = np.asarray(table[C.CANDIDATE].to_numpy(zero_copy_only=False), dtype=np.int64)
    synthetic = np.asarray([s == "synthetic" for s in table[C.SOURCE].to_pylist()], dtype=bool)
    itm = np.asarray(table[C.ITM].to_numpy(zero_copy_only=False), dtype=np.float32)
    kept, reason = decide(keys, candidate, synthetic, itm, table[C.REASON].to_pylist(), float(threshold), keep_top)
    out = table
    for name, arr in ((C.KEPT, pa.array(kept, pa.bool_())), (C.REASON, pa.array(reason, pa.string())),
                      (C.ITM_THRESHOLD, pa.array(np.full(len(kept), threshold, np.float32), pa.float32()))):
        i = out.schema.get_field_index(name)
        out = out.set_column(i, out.schema.field(name), arr) if i >= 0 else out.append_column(name, arr)
    return out


def tally(table: pa.Table) -> dict[str, int]:
    """Rows by outcome: ``kept:<source>`` or ``reason:<reason without its detail>``."""
    out: dict[str, int] = {}
    for src, kept, reason in zip(table[C.SOURCE].to_pylist(), table[C.KEPT].to_pylist(), table[C.REASON].to_pylist()):
        tag = f"kept:{src}" if kept else f"reason:{(reason or '').split(':')[0]}"
        out[tag] = out.get(tag, 0) + 1
    return out


__all__ = ["JUDGED", "R_BELOW", "R_EMPTY", "R_IMAGE", "R_NOT_TOP", "R_PRESCREEN", "decide", "judge", "tally"]
