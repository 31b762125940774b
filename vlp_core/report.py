"""``vlp report``: one self-contained HTML page about every version in the catalog.

Plots are drawn with matplotlib's Agg backend and inlined as base64 PNG, sample images are
read from the ingest shards (:mod:`vlp_core.shards`) and inlined too, so the file can be
mailed or opened offline.  Sections: versions table (with the quality gate's state), ITM score
histograms per version, kept ratio by source, metrics across versions (rounds), and sample
images with their web and synthetic captions (kept or dropped, with scores).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Optional, Sequence

from vlp_core import catalog
from vlp_core.io import atomic_path
from vlp_core.layout import resolve
from vlp_core.schema import C
from vlp_core.shards import ShardReader


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img_tag(b64: str, alt: str, mime: str = "image/png", width: Optional[int] = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img alt="{html.escape(alt)}" src="data:{mime};base64,{b64}"{w}>'


def _score_histograms(con, versions: Sequence[str]) -> Optional[str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    drawn = False
    for v in versions:
        vals = [r[0] for r in con.execute(
            f"SELECT {C.ITM} FROM corpus WHERE version = ? AND {C.ITM} IS NOT NULL", [v]).fetchall()]
        if vals:
            ax.hist(vals, bins=40, range=(0, 1), histtype="step", linewidth=1.5, label=v)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("ITM score")
    ax.set_ylabel("candidates")
    ax.set_title("ITM score per version")
    ax.legend(fontsize=8)
    return _png(fig)


def _kept_by_source(con, versions: Sequence[str]) -> Optional[str]:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = con.execute(
        f"""SELECT version, {C.SOURCE}, avg(CASE WHEN kept THEN 1.0 ELSE 0.0 END) FROM corpus
            GROUP BY ALL"""
    ).fetchall()
    if not rows:
        return None
    sources = sorted({r[1] for r in rows})
    ratio = {(r[0], r[1]): r[2] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.8 / max(1, len(versions))
    x = np.arange(len(sources))
    for i, v in enumerate(versions):
        ax.bar(x + i * width, [ratio.get((v, s), 0.0) for s in sources], width, label=v)
    ax.set_xticks(x + width * (len(versions) - 1) / 2, sources)
    ax.set_ylim(0, 1)
    ax.set_ylabel("kept ratio")
    ax.set_title("kept ratio by source")
    ax.legend(fontsize=8)
    return _png(fig)


def _metrics_across(con, versions: Sequence[str], max_metrics: int = 8) -> Optional[str]:
    import matplotlib.pyplot as plt

    rows = con.execute("SELECT version, stage || '.' || metric, value FROM metrics").fetchall()
    if not rows:
        return None
    names = sorted({r[1] for r in rows})
    preferred = [n for n in names if any(k in n for k in ("r_mean", "r1", "R@1", "bleu", "cider", "accuracy"))]
    chosen = (preferred or names)[:max_metrics]
    val = {(r[0], r[1]): r[2] for r in rows}
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for m in chosen:
        ax.plot(range(len(versions)), [val.get((v, m)) for v in versions], marker="o", label=m)
    ax.set_xticks(range(len(versions)), versions, rotation=20)
    ax.set_title("metrics across versions")
    ax.legend(fontsize=7)
    return _png(fig)


def _samples(con, version: str, n: int, base_dir: Path) -> list[dict[str, Any]]:
    keys = con.execute(
        f"""SELECT DISTINCT {C.SHARD}, {C.KEY}, coalesce({C.URL}, {C.KEY}) AS ident FROM corpus
            WHERE version = ? AND {C.SHARD} IS NOT NULL AND {C.SOURCE} <> 'human'
            ORDER BY ident LIMIT ?""", [version, n]).fetchall()
    reader = ShardReader()
    out = []
    for shard, key, ident in keys:
        path = resolve(shard, base_dir)  # references are relative to the work dir
        try:
            data = reader.read_bytes(str(path), key)
            b64 = base64.b64encode(data).decode("ascii")
        except Exception as exc:  # a missing shard leaves a note, not a broken report
            b64 = None
            note = f"{exc.__class__.__name__}: {exc}"
        else:
            note = ""
        cands = con.execute(
            f"""SELECT {C.CANDIDATE}, {C.SOURCE}, {C.TEXT}, {C.KEPT}, {C.ITM}, {C.REASON} FROM corpus
                WHERE version = ? AND coalesce({C.URL}, {C.KEY}) = ? ORDER BY {C.CANDIDATE}""",
            [version, ident]).fetchall()
        out.append({"key": key, "url": ident, "image": b64, "note": note, "candidates": cands})
    return out


def _mime(data_b64: str) -> str:
    head = base64.b64decode(data_b64[:16])
    if head.startswith(b"\x89PNG"):
        return "image/png"
    if head[:4] == b"RIFF":
        return "image/webp"
    return "image/jpeg"


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}.kept{color:#075}.drop{color:#a22}
.sample{display:flex;gap:1em;margin:.6em 0;align-items:flex-start}img.px{image-rendering:pixelated}"""


def write_report(catalog_file: str | Path, out: str | Path, versions: Optional[Sequence[str]] = None,
                 n_samples: int = 8, base_dir: str | Path = ".") -> Path:
    """Write the HTML report of ``versions`` (default: all, oldest first) to ``out``."""
    con = catalog.connect(catalog_file, read_only=True)
    try:
        all_versions = [r[0] for r in con.execute("SELECT name FROM versions ORDER BY created, name").fetchall()]
        if versions:
            for v in versions:
                catalog.check_version_name(v)
                if v not in all_versions:
                    raise catalog.CatalogError(f"{catalog_file}: no version {v!r}")
        chosen = list(versions or all_versions)
        if not chosen:
            raise catalog.CatalogError(f"{catalog_file}: no versions recorded yet")
        import matplotlib

        matplotlib.use("Agg")
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>vlp report</title>"
                 f"<style>{_CSS}</style></head><body><h1>Versions report</h1>"]
        cols, rows = ["name", "created", "round", "git_rev", "rows", "kept", "state", "state_reason"], []
        for d in catalog.list_versions(catalog_file):
            if d["name"] in chosen:
                rows.append(["-" if d[c] is None else d[c] for c in cols])
        parts.append("<h2>Versions</h2><table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>")
        for r in rows:
            parts.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in r) + "</tr>")
        parts.append("</table>")
        for title, b64 in (("ITM score histograms", _score_histograms(con, chosen)),
                           ("Kept ratio by source", _kept_by_source(con, chosen)),
                           ("Metrics across versions", _metrics_across(con, chosen))):
            parts.append(f"<h2>{title}</h2>")
            parts.append(_img_tag(b64, title) if b64 else "<p>(no data)</p>")
        latest = chosen[-1]
        parts.append(f"<h2>Sample images ({html.escape(latest)})</h2>")
        for s in _samples(con, latest, n_samples, Path(base_dir)):
            img = (_img_tag(s["image"], s["key"], _mime(s["image"]), width=144).replace("<img", "<img class='px'")
                   if s["image"] else f"<p>image unavailable: {html.escape(s['note'])}</p>")
            items = []
            for cand, src, text, kept, itm, reason in s["candidates"]:
                cls, word = ("kept", "kept") if kept else ("drop", f"dropped ({reason or ''})")
                score = "-" if itm is None else f"{itm:.3f}"
                items.append(f"<li class='{cls}'>[{html.escape(str(src))} #{cand}] {html.escape(str(text))} "
                             f"&mdash; itm {score}, {html.escape(word)}</li>")
            parts.append(f"<div class='sample'>{img}<div><b>{html.escape(str(s['url']))}</b>"
                         f"<ul>{''.join(items)}</ul></div></div>")
        parts.append("</body></html>")
    finally:
        con.close()
    out = Path(out)
    with atomic_path(out) as tmp:
        tmp.write_text("\n".join(parts))
    return out


__all__ = ["write_report"]
