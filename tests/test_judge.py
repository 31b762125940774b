"""The keep rule, once (capfilt/judge.py): the same decisions as the per-row rule the CapFilt
stage applied before the score/judge split, and pure (rethreshold = judge run again)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from vlp_core.capfilt.judge import R_BELOW, R_EMPTY, R_IMAGE, R_NOT_TOP, R_PRESCREEN, decide, judge
from vlp_core.schema import CORPUS_SCHEMA, C


def _old_rule(itm, prior, k, threshold, keep_top):
    """The stage's per-row rule before the split (its top-N mask included), for (images, 1 + k) rows."""
    n_img = len(itm) // (1 + k)
    top = None
    if keep_top is not None and k > 0:
        syn = itm.reshape(n_img, 1 + k)[:, 1:]
        passed = np.nan_to_num(syn, nan=-np.inf) > threshold
        order = np.argsort(np.where(passed, -syn, np.inf), axis=1, kind="stable")
        rank = np.empty_like(order)
        np.put_along_axis(rank, order, np.broadcast_to(np.arange(syn.shape[1]), syn.shape), axis=1)
        top = passed & (rank < keep_top)
    kept, reason = [], []
    for i in range(n_img):
        for c in range(1 + k):
            p = i * (1 + k) + c
            if prior[p] is not None:
                kr = (False, prior[p])
            elif float(itm[p]) <= threshold:
                kr = (False, R_BELOW)
            elif c > 0 and top is not None and not top[i, c - 1]:
                kr = (False, R_NOT_TOP)
            else:
                kr = (True, None)
            kept.append(kr[0])
            reason.append(kr[1])
    return np.array(kept), reason


@pytest.mark.parametrize("keep_top", [None, 1, 2])
@pytest.mark.parametrize("seed", range(5))
def test_same_decisions_as_the_per_row_rule(seed, keep_top):
    rng = np.random.default_rng(seed)
    n_img, k = 60, 4
    n = n_img * (1 + k)
    itm = np.round(rng.random(n), 1).astype(np.float32)  # many ties
    prior = [None] * n
    for p in rng.choice(n, 40, replace=False):
        prior[p] = str(rng.choice([R_EMPTY, R_PRESCREEN, f"{R_IMAGE}: OSError: x"]))
        itm[p] = np.nan
    keys = np.repeat([f"{i:05d}" for i in rng.permutation(n_img)], 1 + k)  # not in key order
    cand = np.tile(np.arange(1 + k), n_img)
    for threshold in (0.0, 0.35, 0.5, 0.9):
        want_kept, want_reason = _old_rule(itm, prior, k, threshold, keep_top)
        kept, reason = decide(keys, cand, cand > 0, itm, prior, threshold, keep_top)
        assert kept.tolist() == want_kept.tolist() and reason == want_reason
        # judging again at another threshold, from the judged reasons, gives the same as from scratch
        k2, r2 = decide(keys, cand, cand > 0, itm, reason, 0.2, keep_top)
        k3, r3 = decide(keys, cand, cand > 0, itm, prior, 0.2, keep_top)
        assert k2.tolist() == k3.tolist() and r2 == r3


def test_judge_sets_kept_reason_and_stores_the_threshold():
    rows = [
        {C.KEY: "a", C.CANDIDATE: 0, C.SOURCE: "web", C.ITM: 0.9, C.REASON: None},
        {C.KEY: "a", C.CANDIDATE: 1, C.SOURCE: "synthetic", C.ITM: 0.8, C.REASON: None},
        {C.KEY: "a", C.CANDIDATE: 2, C.SOURCE: "synthetic", C.ITM: 0.95, C.REASON: None},
        {C.KEY: "a", C.CANDIDATE: 3, C.SOURCE: "synthetic", C.ITM: 0.1, C.REASON: None},
        {C.KEY: "b", C.CANDIDATE: 0, C.SOURCE: "web", C.ITM: None, C.REASON: R_EMPTY},
    ]
    base = [{**{f.name: None for f in CORPUS_SCHEMA}, C.KEPT: False, C.ROUND: 0, **r} for r in rows]
    t = judge(pa.Table.from_pylist(base, schema=CORPUS_SCHEMA), 0.5, keep_top=1)
    assert t.schema.equals(CORPUS_SCHEMA)
    assert t[C.KEPT].to_pylist() == [True, False, True, False, False]
    assert t[C.REASON].to_pylist() == [None, R_NOT_TOP, None, R_BELOW, R_EMPTY]
    assert t[C.ITM_THRESHOLD].to_pylist() == [0.5] * 5
    again = judge(t, 0.05, keep_top=None)
    assert again[C.KEPT].to_pylist() == [True, True, True, True, False]
    assert again[C.REASON].to_pylist() == [None, None, None, None, R_EMPTY]
