"""``rethreshold``: apply a new ITM threshold to a CapFilt corpus from its stored scores.

No model pass: the keep rule (:func:`vlp_core.capfilt.judge.judge`, the same function the
CapFilt run uses) is applied again to each shard's stored scores.  Rows rejected for other
reasons (``empty_text``, ``itc_prescreen``, ``image_decode_error: ...``) keep them.  The threshold is either given
(``itm_threshold``) or the ``percentile``-th percentile of the filter's ITM on the clean
pairs stored by the calibrated run (``calibration.parquet``), so
``rethreshold(corpus, out, t)`` equals a full CapFilt run with the fixed threshold ``t``.
``keep_top`` (``capfilt.keep_top``) applies the same top-N-by-ITM rule to the synthetic
captions as the run does; rows dropped by it (``not_top_itm``) are judged again.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Optional

from vlp_core.errors import VlpError
from vlp_core.io import StageStats, read_json, read_parquet, read_parquet_schema, write_json, write_parquet
from vlp_core.schema import CORPUS_SCHEMA, C, conform, require_columns

from vlp_core.capfilt.judge import judge, tally
from vlp_core.capfilt.stage import CALIBRATION_FILE, THRESHOLD_FILE, check_keep_top
from vlp_core.corpus import CORPUS_DIR, corpus_folder


def percentile_threshold(calibration: str | Path, percentile: float) -> float:
    """The ``percentile``-th percentile (linear, as numpy) of the stored clean-pair ITM scores."""
    import duckdb

    path = Path(calibration)
    if not path.is_file():
        raise VlpError(f"{path}: no stored calibration scores (run capfilt with threshold_mode=calibrated "
                       "and --calibration first, or give an ITM threshold)")
    require_columns(read_parquet_schema(path), [C.ITM], path)  # one line for a damaged file
    with duckdb.connect() as con:
        return float(con.execute(f"SELECT quantile_cont({C.ITM}, $q) FROM read_parquet($p)",
                                 {"q": percentile / 100.0, "p": str(path)}).fetchone()[0])


def rethreshold(corpus_dir: str | Path, out_dir: str | Path, itm_threshold: Optional[float] = None,
                percentile: Optional[float] = None, calibration: Optional[str | Path] = None,
                keep_top: Optional[int] = None) -> StageStats:
    """Write ``out_dir/corpus/<shard>.parquet`` = the corpus of ``corpus_dir`` with ``kept``
    and ``reason`` recomputed at the new threshold (``itm_threshold``, or ``percentile`` of
    ``calibration`` / the stage folder's ``calibration.parquet``), keeping at most ``keep_top``
    synthetic captions per image (None: all above the threshold)."""
    t0 = time.perf_counter()
    check_keep_top(keep_top)
    folder = corpus_folder(corpus_dir)
    stage_dir = folder.parent if folder.name == CORPUS_DIR else folder
    if (itm_threshold is None) == (percentile is None):
        raise VlpError("rethreshold: give exactly one of an ITM threshold or a calibration percentile")
    if itm_threshold is None:
        cal = Path(calibration) if calibration else stage_dir / CALIBRATION_FILE
        itm_threshold = percentile_threshold(cal, float(percentile))
    out_dir = Path(out_dir)
    if out_dir.resolve() == stage_dir.resolve():
        raise VlpError(f"{out_dir}: rethreshold writes a new corpus; choose another --out than the input")
    stats = StageStats(stage="capfilt_rethreshold")
    files = sorted(folder.glob("*.parquet"))
    required = [n for n in CORPUS_SCHEMA.names if n != C.ITM_THRESHOLD]  # older corpora lack it
    for f in files:  # every input readable before the first output is written
        require_columns(read_parquet_schema(f), required, f)
    for f in files:
        stored = read_parquet(f)
        table = judge(conform(stored, CORPUS_SCHEMA), float(itm_threshold), keep_top)
        stats.rows_in += stored.num_rows
        stats.rows_out += table.num_rows
        write_parquet(table, out_dir / CORPUS_DIR / f.name)
        for tag, n in tally(table).items():
            stats.add(tag, n)
        marker = folder / f"{f.stem}_stats.json"
        old = read_json(marker) if marker.is_file() else {}
        write_json({**old, "rethreshold": {"from": str(f), "itm_threshold": itm_threshold,
                                           "keep_top": keep_top}},
                   out_dir / CORPUS_DIR / f"{f.stem}_stats.json")
        stats.shards_done += 1
    if (stage_dir / CALIBRATION_FILE).is_file():  # so a later rethreshold by percentile works on the output
        shutil.copyfile(stage_dir / CALIBRATION_FILE, out_dir / CALIBRATION_FILE)
    old_thr = read_json(stage_dir / THRESHOLD_FILE) if (stage_dir / THRESHOLD_FILE).is_file() else {}
    write_json({"mode": "rethreshold", "itm_threshold": itm_threshold, "percentile": percentile,
                "keep_top": keep_top,
                "from": str(stage_dir), "previous": old_thr}, out_dir / THRESHOLD_FILE)
    stats.seconds = time.perf_counter() - t0
    stats.extra = {"itm_threshold": itm_threshold, "percentile": percentile, "keep_top": keep_top,
                   "from": str(stage_dir)}
    stats.check().write(out_dir)
    return stats


__all__ = ["percentile_threshold", "rethreshold"]
