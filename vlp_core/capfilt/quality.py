"""How well the filter finds injected noise: precision, recall and ROC-AUC per noise kind.

Evaluation only (benchmarks and tests): it reads the synthetic world's ground truth, which
the pipeline itself never reads.  The web candidates (``candidate == 0``) of a CapFilt corpus
are joined to ``ground_truth.parquet`` by URL path.  A candidate is *flagged* as noise when it
was not kept; its noise score for ROC-AUC is ``-itm`` (unscored rejects, e.g. empty texts or
ITC pre-screened ones, count as the most suspicious).  Per kind, the binary problem is
"clean vs that kind".
"""
from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.audit import roc_auc
from vlp_core.schema import C


def _url_path(url: Any) -> str:
    return urlparse(url).path if isinstance(url, str) and "://" in url else str(url)


def detection_report(corpus: pa.Table | str | Path, ground_truth: str | Path) -> dict[str, dict[str, float]]:
    """``{kind: {n_clean, n_noisy, precision, recall, roc_auc}}`` for every noise kind and
    ``"all"``, over the web candidates whose image decoded."""
    if not isinstance(corpus, pa.Table):
        p = Path(corpus)
        folder = p / "corpus" if (p / "corpus").is_dir() else p
        corpus = pq.read_table(sorted(folder.glob("*.parquet")) if folder.is_dir() else folder)
    gt = pq.read_table(ground_truth, columns=[C.URL, C.IS_NOISE, C.NOISE_KIND]).to_pylist()
    truth = {r[C.URL]: (bool(r[C.IS_NOISE]), r[C.NOISE_KIND]) for r in gt}
    noisy, kinds, score, flagged = [], [], [], []
    for url, cand, itm, kept, reason in zip(*(corpus[c].to_pylist() for c in (C.URL, C.CANDIDATE, C.ITM, C.KEPT,
                                                                             C.REASON))):
        if cand != 0 or (reason or "").startswith("image_decode_error"):
            continue
        t = truth.get(_url_path(url))
        if t is None:
            continue
        noisy.append(t[0])
        kinds.append(t[1])
        score.append(np.inf if itm is None else -float(itm))
        flagged.append(not kept)
    noisy_a, flagged_a, score_a = np.array(noisy, bool), np.array(flagged, bool), np.array(score)
    out: dict[str, dict[str, float]] = {}
    for kind in sorted({k for k in kinds if k}) + ["all"]:
        m = ~noisy_a | (np.array([k == kind for k in kinds]) if kind != "all" else noisy_a)
        y, f = noisy_a[m], flagged_a[m]
        tp = int((y & f).sum())
        out[kind] = {"n_clean": int((~y).sum()), "n_noisy": int(y.sum()),
                     "precision": tp / max(1, int(f.sum())), "recall": tp / max(1, int(y.sum())),
                     "roc_auc": _nan_if_none(roc_auc(y, score_a[m]))}
    return out


def _nan_if_none(x):
    return float("nan") if x is None else x


def format_report(report: dict[str, dict[str, float]]) -> str:
    lines = [f"{'noise kind':<12} {'clean':>6} {'noisy':>6} {'precision':>9} {'recall':>7} {'ROC-AUC':>8}"]
    for kind, r in report.items():
        lines.append(f"{kind:<12} {r['n_clean']:>6} {r['n_noisy']:>6} {r['precision']:>9.3f} {r['recall']:>7.3f} "
                     f"{r['roc_auc']:>8.3f}")
    return "\n".join(lines)


__all__ = ["detection_report", "format_report"]
