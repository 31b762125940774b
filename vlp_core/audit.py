"""Ground-truth audit of a corpus: what the filter kept, and whether captions are right.

Only evaluation reads the synthetic world's ground truth (``W/ground_truth.parquet``); the
pipeline never does.  Corpus rows join the ground truth on the URL *path*
(:func:`vlp_core.synthetic.truth.url_path`), so any server port works.

``audit_corpus`` answers, for one corpus:

* its size by source (kept rows);
* the noise rate among kept web texts;
* the share of synthetic captions that are fully correct, overall and per attribute;
* the filter's precision, recall and ROC-AUC at detecting noisy web texts and wrong
  synthetic captions ("positive" = bad text; "flagged" = ``kept`` is false; the score is
  ``-itm``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
from scipy.stats import rankdata
import pyarrow.parquet as pq

from vlp_core.schema import C
from vlp_core.synthetic.truth import load_ground_truth, url_path
from vlp_core.synthetic.world import check_caption

ATTRIBUTES = ("colour", "shape", "size", "relation")


def roc_auc(labels: Iterable[bool], scores: Iterable[float]) -> Optional[float]:
    """Area under the ROC curve of ``scores`` for ``labels`` (True = positive), ties averaged.
    None when one class is absent."""
    y = np.asarray(list(labels), dtype=bool)
    s = np.asarray(list(scores), dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(s, method="average")  # 1-based, ties averaged (the Mann-Whitney U statistic)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def detection(bad: Iterable[bool], flagged: Iterable[bool], badness: Iterable[float]) -> dict[str, Optional[float]]:
    """Precision and recall of ``flagged`` at finding ``bad`` rows, and the ROC-AUC of ``badness``."""
    y = np.asarray(list(bad), dtype=bool)
    f = np.asarray(list(flagged), dtype=bool)
    tp = int((y & f).sum())
    return {
        "n": int(len(y)),
        "n_bad": int(y.sum()),
        "precision": tp / int(f.sum()) if f.sum() else None,
        "recall": tp / int(y.sum()) if y.sum() else None,
        "roc_auc": roc_auc(y, badness),
    }


def _read_corpus(corpus: str | Path):
    import pandas as pd

    path = Path(corpus)
    files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
    frames = [pq.read_table(f).to_pandas() for f in files]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=[C.URL, C.SOURCE])


def _truth_frame(world_dir: str | Path):
    gt = load_ground_truth(world_dir).to_pandas()
    return gt.set_index(C.URL)


def _check_captions(texts, paths, gt) -> list[dict]:
    """``check_caption`` of each text against the scene of its image (``paths`` index ``gt``)."""
    return [check_caption(t or "", s) for t, s in zip(texts, gt.loc[paths, C.SCENE].to_numpy())]


def synthetic_candidates(corpus: str | Path, world_dir: str | Path):
    """The synthetic rows of a corpus whose image is in the ground truth, as a DataFrame with a
    ``correct`` column (every attribute right) and ``itm`` with -1 where there is no score."""
    df = _read_corpus(corpus)
    gt = _truth_frame(world_dir)
    df = df[df[C.SOURCE] == "synthetic"].copy()
    paths = df[C.URL].map(lambda u: url_path(u) if isinstance(u, str) else None)
    df = df[paths.isin(gt.index)].copy()
    df["correct"] = [bool(c.get("all")) for c in _check_captions(df[C.TEXT], paths[df.index], gt)]
    df[C.ITM] = df[C.ITM].astype(float).fillna(-1.0)
    return df


def audit_corpus(corpus: str | Path, world_dir: str | Path) -> dict[str, Any]:
    """Audit one corpus (a directory of CORPUS_SCHEMA Parquet files) against the ground truth."""
    df = _read_corpus(corpus)
    gt = _truth_frame(world_dir)
    out: dict[str, Any] = {"rows": int(len(df))}
    if df.empty:
        return out
    kept = df[C.KEPT].astype(bool)
    out["kept_by_source"] = {s: int(((df[C.SOURCE] == s) & kept).sum()) for s in sorted(df[C.SOURCE].unique())}
    out["rows_by_source"] = {s: int((df[C.SOURCE] == s).sum()) for s in sorted(df[C.SOURCE].unique())}

    paths = df[C.URL].map(lambda u: url_path(u) if isinstance(u, str) else None)
    in_gt = paths.isin(gt.index)
    itm = df[C.ITM].astype(float).fillna(-1.0)

    web = (df[C.SOURCE] == "web") & in_gt
    if web.any():
        noisy = gt.loc[paths[web], C.IS_NOISE].to_numpy(dtype=bool)
        kept_web = kept[web].to_numpy()
        out["web_noise_rate_all"] = float(noisy.mean())
        out["web_noise_rate_kept"] = float(noisy[kept_web].mean()) if kept_web.any() else None
        out["web_detection"] = detection(noisy, ~kept_web, -itm[web].to_numpy())
        if df.loc[web, C.ITM].isna().all():  # no filter scored this corpus (raw web, oracle): no ROC
            out["web_detection"]["roc_auc"] = None
        kinds = gt.loc[paths[web], C.NOISE_KIND].fillna("clean").to_numpy()
        out["web_detection_by_kind"] = {
            kind: {"n": int((kinds == kind).sum()), "flagged_rate": float((~kept_web[kinds == kind]).mean())}
            for kind in sorted(set(kinds))
        }

    syn = (df[C.SOURCE] == "synthetic") & in_gt
    if syn.any():
        checks = _check_captions(df.loc[syn, C.TEXT], paths[syn], gt)
        correct = np.array([bool(c.get("all")) for c in checks])
        kept_syn = kept[syn].to_numpy()
        out["synthetic_correct"] = float(correct.mean())
        out["synthetic_correct_kept"] = float(correct[kept_syn].mean()) if kept_syn.any() else None
        out["synthetic_correct_by_attribute"] = {
            a: float(np.mean([c.get(a) is True for c in checks])) for a in ATTRIBUTES
        }
        out["synthetic_detection"] = detection(~correct, ~kept_syn, -itm[syn].to_numpy())
    return out


def oracle_rows(manifest: str | Path, world_dir: str | Path) -> list[int]:
    """Row indices of a web manifest whose text the ground truth says is clean (for the oracle)."""
    gt = _truth_frame(world_dir)
    t = pq.read_table(manifest, columns=[C.ROW, C.URL]).to_pandas()
    paths = t[C.URL].map(url_path)
    ok = paths.isin(gt.index)
    clean = ok & ~gt.reindex(paths)[C.IS_NOISE].fillna(True).to_numpy(dtype=bool)
    return t.loc[clean, C.ROW].astype(int).tolist()


def dump(report: dict[str, Any]) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
