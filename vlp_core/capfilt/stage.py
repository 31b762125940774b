"""``run_capfilt``: caption every web image and filter every candidate text (BLIP's CapFilt).

Inputs: an ingest manifest (``manifest.parquet`` or the ingest folder holding it), a
captioner and a filter model folder (vlp_core checkpoints or local HF BLIP folders), and for
``threshold_mode: calibrated`` a clean (human) manifest.  Output, in ``out_dir``::

    corpus/<shard>.parquet      CORPUS_SCHEMA: one row per (image, candidate text)
    corpus/<shard>_stats.json   the shard's stage-cache entry (its key, inputs and counts)
    feats/<shard>.parquet       the ITC sidecar: the filter's projections of each row, handed to
                                the features stage (vlp_core.corpus; not the features format)
    threshold.json              the ITM threshold used and how it was chosen
    calibration.parquet         the filter's scores on the clean pairs (calibrated mode)
    calibration_stats.json      the calibration's stage-cache entry (calibrated mode)
    stats.json                  StageStats

Candidate 0 of an image is its web alt-text (``source=web``), candidates ``1..K`` are the
captioner's samples (``source=synthetic``).  Every candidate becomes a row.  This stage
*scores* (captions, ITC, ITM); :func:`vlp_core.capfilt.judge.judge` then *decides* from the
scores, storing the threshold with each row.  A rejected row has ``kept=false`` and a reason
(``itm_below_threshold``, ``itc_prescreen``, ``empty_text``, ``image_decode_error: ...``, or ``not_top_itm`` when ``capfilt.keep_top: N`` keeps only an
image's N synthetic captions with the highest ITM among those above the threshold).
Manifest rows whose status is not ``success`` are not candidates; they are counted in
``stats.counts`` as ``skipped:<status>``.

Work is per shard (:func:`run_capfilt_shard`, the unit a Prefect flow fans out over, from
:func:`list_capfilt_shards`): images stream in bounded batches, each image is decoded once
and encoded once per distinct vision encoder (:class:`~vlp_core.capfilt.backend.ImagePass`),
rows stream into a temp Parquet file renamed into place at the end, then the shard's entry in
the stage cache is written (:class:`vlp_core.stagecache.Entry`; its key: the settings, the
captioner's and filter's ids, the threshold, the autocast and the shard's manifest rows).  A
rerun skips the shards whose entry holds the same key and whose corpus file exists.  A shard tar
that is truncated or damaged fails alone with an error naming it (``stats.shards_failed``).
Captioner and filter run under bf16 autocast where ``capfilt.precision`` says so (``auto``: CUDA
and CPUs with native bf16); what it resolved to (``autocast``: bf16 / fp32) is part of the
fingerprint, of the calibration's and of ``stats.extra``.
"""
from __future__ import annotations

import hashlib
import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from vlp_core.capfilt.backend import CapfiltError, ImagePass, dir_content_hash, pick_device, resolve_model_dir
from vlp_core.capfilt.captioner import Captioner
from vlp_core.capfilt.filter import ItmFilter
from vlp_core.capfilt.judge import R_EMPTY, R_IMAGE, R_PRESCREEN, judge, tally
from vlp_core.config import Params, section_dict
from vlp_core.corpus import CORPUS_DIR, FEATS_DIR, ItcSidecarWriter, resolve_ref
from vlp_core.errors import VlpError
from vlp_core.holdout import held_out
from vlp_core.images import decode_image
from vlp_core.io import StageStats, atomic_path, read_parquet, read_parquet_schema, write_json, write_parquet
from vlp_core.layout import as_written
from vlp_core.precision import resolved
from vlp_core.schema import CORPUS_SCHEMA, C, require_columns
from vlp_core.shards import ShardError, ShardReader, load_images
from vlp_core.stagecache import Entry

log = logging.getLogger(__name__)

THRESHOLD_FILE = "threshold.json"
CALIBRATION_FILE = "calibration.parquet"
MANIFEST_FILE = "manifest.parquet"
SUCCESS = "success"
CALIBRATION_SCHEMA = pa.schema([pa.field(C.KEY, pa.string()), pa.field(C.TEXT, pa.string()),
                                pa.field(C.ITC, pa.float32()), pa.field(C.ITM, pa.float32())])

Calibration = Union[None, str, Path, float]


class CapfiltShardError(VlpError, OSError):
    """A shard that cannot be processed (truncated or damaged tar); names the file."""


@dataclass(frozen=True)
class CapfiltShard:
    """One fan-out unit: the manifest, the shard reference as stored in it, and the output name."""

    manifest: str
    shard: str
    name: str


# --------------------------------------------------------------------------- manifests
def manifest_path(manifest: str | Path) -> Path:
    """A manifest file, or an ingest folder holding ``manifest.parquet``."""
    p = Path(manifest)
    if p.is_dir():
        p = p / MANIFEST_FILE
    if not p.is_file():
        raise VlpError(f"{p}: manifest not found")
    return p


def read_manifest(manifest: str | Path, columns: Sequence[str] = (C.KEY, C.URL, C.CAPTION, C.STATUS, C.SHARD)) -> pa.Table:
    p = manifest_path(manifest)
    schema = read_parquet_schema(p)
    require_columns(schema, columns, p)
    return read_parquet(p, columns=list(columns))


def shard_name(ref: str) -> str:
    """``.../00003.tar`` -> ``00003``; a plain image path -> its folder's name."""
    p = Path(ref)
    return p.stem if p.suffix == ".tar" else (p.parent.name or "images")


def list_capfilt_shards(params_or_manifest: Any, manifest: Optional[str | Path] = None) -> list[CapfiltShard]:
    """The shards of ``manifest`` that hold successful rows, in name order.  Accepts
    ``list_capfilt_shards(manifest)`` or ``list_capfilt_shards(params, manifest)``."""
    m = manifest if manifest is not None else params_or_manifest
    mp = manifest_path(m)
    table = read_manifest(mp, (C.STATUS, C.SHARD))
    ok = table.filter(pc.equal(table[C.STATUS], SUCCESS))
    refs = sorted(set(r for r in ok[C.SHARD].to_pylist() if r))
    by_name: dict[str, list[str]] = {}
    for r in refs:
        by_name.setdefault(shard_name(r), []).append(r)
    out = []
    for name, rs in sorted(by_name.items()):
        if len(rs) == 1 and rs[0].endswith(".tar"):
            out.append(CapfiltShard(str(mp), rs[0], name))
        else:  # plain image files grouped by folder: the unit is the folder
            out.append(CapfiltShard(str(mp), str(Path(rs[0]).parent), name))
    return out


def _shard_rows(shard: CapfiltShard) -> pa.Table:
    table = read_manifest(shard.manifest)
    ok = table.filter(pc.equal(table[C.STATUS], SUCCESS))
    refs = ok[C.SHARD].to_pylist()
    if shard.shard.endswith(".tar"):
        mask = [r == shard.shard for r in refs]
    else:
        mask = [r is not None and not r.endswith(".tar") and str(Path(r).parent) == shard.shard for r in refs]
    return ok.filter(pa.array(mask, pa.bool_()))


# --------------------------------------------------------------------------- threshold
def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def calibration_scores(params: Params, filter_dir: str | Path, calibration: str | Path,
                       root: str | Path = ".") -> pa.Table:
    """The filter's ITC and ITM on every clean pair of the ``calibration`` manifest (its shard
    references relative to the work dir ``root``) that the filter's fine-tune held out
    (``finetune.filter.holdout``, vlp_core/holdout.py; 0: every pair)."""
    mp = manifest_path(calibration)
    t = read_manifest(mp)
    t = t.filter(pc.equal(t[C.STATUS], SUCCESS))
    share = params.finetune.filter.holdout
    if share > 0:
        n = t.num_rows
        t = t.filter(pa.array(held_out(t[C.KEY].to_pylist(), share)))
        if not t.num_rows:
            raise VlpError(f"{mp}: finetune.filter.holdout {share} holds out none of its {n} clean pairs, "
                           "so there is nothing to calibrate the threshold on (raise the share)")
    flt = ItmFilter(filter_dir, batch_size=params.capfilt.batch_size, precision=params.capfilt.precision)
    keys, texts, itcs, itms = [], [], [], []
    bs = params.capfilt.batch_size
    rows = t.to_pylist()
    base = mp.parent
    for i in range(0, len(rows), bs):
        chunk = [r for r in rows[i:i + bs] if (r[C.CAPTION] or "").strip()]
        if not chunk:
            continue
        imgs, reasons = load_images([(resolve_ref(r[C.SHARD], root, base), r[C.KEY]) for r in chunk],
                                    flt.backend.spec.size)
        good = [j for j, why in enumerate(reasons) if why is None]
        if not good:
            continue
        emb = flt.encode(imgs[good])
        itc, itm = flt.scores(emb, [chunk[j][C.CAPTION] for j in good])
        keys += [chunk[j][C.KEY] for j in good]
        texts += [chunk[j][C.CAPTION] for j in good]
        itcs.append(itc)
        itms.append(itm)
    if not keys:
        raise VlpError(f"{mp}: no clean pair to calibrate the threshold on (no success row with an image and a caption)")
    return pa.table({C.KEY: keys, C.TEXT: texts, C.ITC: np.concatenate(itcs), C.ITM: np.concatenate(itms)},
                    schema=CALIBRATION_SCHEMA)


def calibrate_threshold(params: Params, filter_dir: str | Path, calibration: Calibration,
                        out_dir: str | Path, root: str | Path = ".") -> float:
    """The ITM threshold of this run, recorded in ``out_dir/threshold.json``.

    ``fixed``: ``capfilt.itm_threshold``.  ``calibrated``: the ``calibrate_percentile``-th
    percentile of the filter's ITM on the clean pairs of the ``calibration`` manifest (the
    scores are kept in ``calibration.parquet`` so :func:`~vlp_core.capfilt.rethreshold.rethreshold`
    can re-derive it without a model pass).  A float ``calibration`` is taken as the
    threshold already decided (the Prefect fan-out computes it once for all shards)."""
    cp = params.capfilt
    out_dir = Path(out_dir)
    if isinstance(calibration, (float, int)) and not isinstance(calibration, bool):
        return float(calibration)
    filter_id = dir_content_hash(resolve_model_dir(filter_dir)[0])
    if cp.threshold_mode == "fixed":
        rec = {"mode": "fixed", "itm_threshold": cp.itm_threshold, "filter_id": filter_id}
        write_json(rec, out_dir / THRESHOLD_FILE)
        return float(cp.itm_threshold)
    if calibration is None:
        raise VlpError("capfilt.threshold_mode is calibrated but no calibration manifest was given "
                       "(pass --calibration M, or set -S capfilt.threshold_mode=fixed)")
    mp = manifest_path(calibration)
    fp = {"mode": "calibrated", "percentile": cp.calibrate_percentile, "filter_id": filter_id,
          "calibration": as_written(mp, root), "calibration_sha": _file_sha(mp),
          "autocast": resolved(cp.precision, pick_device())}  # the scores' arithmetic: bf16 or fp32
    if params.finetune.filter.holdout > 0:  # only the held-out pairs are scored
        fp["holdout"] = params.finetune.filter.holdout
    tpath = out_dir / THRESHOLD_FILE
    entry = Entry("capfilt", "calibration", out_dir, fp)  # the stage cache decides whether to score again
    old = entry.cached(tpath, out_dir / CALIBRATION_FILE)
    if old is not None:
        return float(old["itm_threshold"])
    scores = calibration_scores(params, filter_dir, mp, root)
    write_parquet(scores, out_dir / CALIBRATION_FILE)
    itm = scores[C.ITM].to_numpy()
    thr = float(np.percentile(itm, cp.calibrate_percentile))
    write_json({**fp, "itm_threshold": thr, "n_calibration": len(itm),
                "calibration_itm_quantiles": {str(q): float(np.percentile(itm, q)) for q in (1, 5, 10, 25, 50, 75, 90)}},
               tpath)
    entry.done({"itm_threshold": thr, "n_calibration": len(itm)})
    return thr


# --------------------------------------------------------------------------- one shard
def _rows_digest(rows: pa.Table) -> str:
    """The digest of a shard's manifest rows (keys, URLs, captions, references): the shard's
    input in its stage-cache key (a re-ingested shard under the same name is redone)."""
    h = hashlib.sha256()
    for col in (C.KEY, C.URL, C.CAPTION, C.SHARD):
        h.update(repr(rows[col].to_pylist()).encode())
    return h.hexdigest()[:16]


def capfilt_settings(params: Params) -> dict[str, Any]:
    """The ``capfilt`` settings a shard's rows depend on.  ``captioner`` (where the rounds get the
    captioner from) is left out: the captioner's id stands for it, and shards fingerprinted before
    the setting existed stay valid."""
    return {k: v for k, v in section_dict(params, "capfilt").items() if k != "captioner"}


def _fingerprint(params: Params, captioner_id: Optional[str], filter_id: str, threshold: float, round: int,
                 autocast: str) -> dict[str, Any]:
    """What a shard's rows depend on; ``autocast`` is what ``capfilt.precision`` resolved to on
    this device (``auto`` means bf16 on one machine and fp32 on another); ``captioner_id`` is None
    for CapFilt without a captioner (its fingerprint then says ``num_captions`` 0)."""
    settings = capfilt_settings(params)
    if captioner_id is None:
        settings["num_captions"] = 0
    return {"capfilt": settings, "captioner_id": captioner_id, "filter_id": filter_id,
            "itm_threshold": round_float(threshold), "round": round, "autocast": autocast}


def check_keep_top(keep_top: Optional[int]) -> None:
    """``capfilt.keep_top``: None (keep every candidate above the threshold) or N >= 1."""
    if keep_top is not None and (isinstance(keep_top, bool) or not isinstance(keep_top, int) or keep_top < 1):
        raise CapfiltError(f"capfilt.keep_top must be null or a whole number >= 1, got {keep_top!r}")


def round_float(x: float) -> float:
    return float(f"{x:.9g}")


def _is_text(t: Any) -> bool:
    return isinstance(t, str) and bool(t.strip())


def run_capfilt_shard(params: Params, shard: CapfiltShard, captioner: Optional[str | Path], filter: str | Path,
                      out_dir: str | Path, round: int = 0, calibration: Calibration = None,
                      device: Optional[str] = None, root: str | Path = ".") -> dict[str, Any]:
    """Caption and filter ONE shard into ``out_dir/corpus/<shard.name>.parquet`` (its image
    references relative to the work dir ``root``, :func:`vlp_core.corpus.resolve_ref`); returns the
    shard's stats (also its done marker).  Idempotent: a shard whose marker matches this
    run's fingerprint is skipped.  Raises :class:`CapfiltShardError` for a damaged tar.
    ``captioner=None``: no captioner, the filter judges each image's web text only (one candidate
    per image, whatever ``num_captions`` says; ``captioner_id`` is null in the rows)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    cp = params.capfilt
    check_keep_top(cp.keep_top)
    out_dir = Path(out_dir)
    corpus = out_dir / CORPUS_DIR
    threshold = calibrate_threshold(params, filter, calibration, out_dir, root)
    cap = None if captioner is None else Captioner(captioner, cp, device=device)
    k = 0 if cap is None else cp.num_captions
    flt = ItmFilter(filter, device=device, batch_size=max(cp.batch_size, 1) * (k + 1), precision=cp.precision)
    arith = resolved(cp.precision, flt.backend.device)  # bf16 or fp32 on this device
    rows = _shard_rows(shard)
    cap_id = None if cap is None else cap.model_id
    fp = _fingerprint(params, cap_id, flt.model_id, threshold, round, arith)
    entry = Entry("capfilt", shard.name, corpus, {**fp, "rows": _rows_digest(rows)})
    out_path = corpus / f"{shard.name}.parquet"
    old = entry.cached(out_path)  # the stage cache decides: same inputs, output in place
    if old is not None:
        return {**old, "skipped": True}
    base = Path(shard.manifest).parent
    n_img = rows.num_rows
    stats: dict[str, Any] = {"shard": shard.name, "images": n_img, "rows_in": n_img * (1 + k), "rows_out": 0,
                             "counts": {}, "fingerprint": fp}
    counts: dict[str, int] = stats["counts"]
    imgpass = ImagePass([flt.backend] if cap is None else [cap.backend, flt.backend], cp.precision)
    reader = ShardReader()
    # the shard's own random stream: its captions depend neither on shard order nor on other
    # shards running concurrently in threads (Prefect's default runner)
    gen = None if cap is None else torch.Generator(device=cap.backend.device).manual_seed(
        cp.seed + zlib.crc32(shard.name.encode()))
    keys, urls, refs, caps_web = (rows[c].to_pylist() for c in (C.KEY, C.URL, C.SHARD, C.CAPTION))
    bs = max(1, cp.batch_size)
    dsize = imgpass.decode_size
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, CORPUS_SCHEMA) as writer, \
            ItcSidecarWriter(out_dir / FEATS_DIR / f"{shard.name}.parquet", flt.model_id, arith) as feats, \
            torch.inference_mode(), \
            tqdm(total=n_img, desc=f"capfilt {shard.name}", unit="img", disable=None, leave=False) as bar:
        for s in range(0, n_img, bs):
            e = min(n_img, s + bs)
            # ---- read + decode once (the bytes' sha256 goes to the ITC sidecar)
            imgs = np.zeros((e - s, dsize, dsize, 3), np.uint8)
            bad: dict[int, str] = {}
            shas: list[Optional[str]] = [None] * (e - s)
            for j in range(s, e):
                ref = resolve_ref(refs[j], root, base)
                try:
                    data = reader.read_bytes(ref, keys[j])
                except (ShardError, KeyError, FileNotFoundError) as exc:
                    if ref.endswith(".tar"):
                        raise CapfiltShardError(f"{ref}: truncated or damaged shard ({exc}); the manifest lists "
                                                f"key {keys[j]} as {SUCCESS}. Re-ingest this shard") from None
                    bad[j - s] = f"{R_IMAGE}: {exc.__class__.__name__}: {exc}"
                    continue
                shas[j - s] = hashlib.sha256(data).hexdigest()
                try:
                    imgs[j - s] = decode_image(data, dsize)
                except Exception as exc:  # PIL raises many types for corrupt data
                    bad[j - s] = f"{R_IMAGE}: {exc.__class__.__name__}: {exc}"
            good = [i for i in range(e - s) if i not in bad]
            # ---- encode once per distinct vision encoder, caption, score
            texts: list[list[Optional[str]]] = [[caps_web[s + i]] + [None] * k for i in range(e - s)]
            cand_src = ["web"] + ["synthetic"] * k
            n = (e - s) * (1 + k)
            itc = np.full(n, np.nan, np.float32)
            itm = np.full(n, np.nan, np.float32)
            img_feat: Optional[np.ndarray] = None  # the filter's ITC projections, for the sidecar
            txt_feat: Optional[np.ndarray] = None
            img_ok = np.zeros(e - s, bool)
            txt_ok = np.zeros(n, bool)
            if good:
                emb = imgpass.encode(imgs[good])
                if k > 0:  # (k is 0 without a captioner)
                    for gi, caps in zip(good, cap.caption(emb[cap.vision_key], k, generator=gen)):
                        texts[gi][1:] = caps
                flat_rows = [(gi, gpos, c) for gpos, gi in enumerate(good) for c in range(1 + k)
                             if _is_text(texts[gi][c])]
                pos = np.array([gi * (1 + k) + c for gi, _, c in flat_rows], np.int64)
                if flat_rows:
                    sc_itc, sc_itm, f_img, f_txt = flt.scores(
                        emb[flt.vision_key], [texts[gi][c] for gi, _, c in flat_rows],
                        image_index=[gpos for _, gpos, _ in flat_rows], itc_prescreen=cp.itc_prescreen,
                        return_feats=True)
                    itc[pos], itm[pos] = sc_itc, sc_itm
                else:  # no text to score (K=0, empty alt-texts): the sidecar still gets the images'
                    f_img, f_txt = flt.image_feat(emb[flt.vision_key]).cpu().numpy(), None
                img_feat = np.zeros((e - s, f_img.shape[1]), np.float32)
                txt_feat = np.zeros((n, f_img.shape[1]), np.float32)
                img_feat[good], img_ok[good] = f_img, True
                if f_txt is not None:
                    txt_feat[pos], txt_ok[pos] = f_txt, True
            # ---- rows: scores, and why a row could not be scored; then the rule decides (judge.py)
            prior = [bad[i] if i in bad else R_EMPTY if not _is_text(texts[i][c])
                     else R_PRESCREEN if np.isnan(itm[i * (1 + k) + c]) else None
                     for i in range(e - s) for c in range(1 + k)]

            def per_row(values: list) -> list:  # one value per image -> one per candidate row
                return [v for v in values[s:e] for _ in range(1 + k)]

            table = judge(pa.table({
                C.KEY: per_row(keys), C.URL: per_row(urls), C.SHARD: per_row(refs),
                C.CANDIDATE: pa.array(list(range(1 + k)) * (e - s), pa.int16()),
                C.TEXT: pa.array([t for row in texts for t in row], pa.string()),
                C.SOURCE: cand_src * (e - s),
                C.ITC: pa.array(itc, pa.float32(), mask=np.isnan(itc)),
                C.ITM: pa.array(itm, pa.float32(), mask=np.isnan(itm)),
                C.KEPT: pa.array(np.zeros(n, bool), pa.bool_()), C.REASON: pa.array(prior, pa.string()),
                C.CAPTIONER_ID: pa.array([cap_id] * n, pa.string()), C.FILTER_ID: [flt.model_id] * n,
                C.ROUND: pa.array([round] * n, pa.int32()),
                C.ITM_THRESHOLD: pa.nulls(n, pa.float32())}, schema=CORPUS_SCHEMA), threshold, cp.keep_top)
            for tag, c in tally(table).items():
                counts[tag] = counts.get(tag, 0) + c
            writer.write_table(table)
            stats["rows_out"] += n
            row_img_feat = None if img_feat is None else np.repeat(img_feat, 1 + k, axis=0)
            feats.write(table, [h for h in shas for _ in range(1 + k)], row_img_feat, np.repeat(img_ok, 1 + k),
                        txt_feat, txt_ok)
            bar.update(e - s)
    stats["vision_passes"] = imgpass.passes
    stats["vision_encoders"] = imgpass.n_encoders
    stats["seconds"] = round_float(time.perf_counter() - t0)
    entry.done(stats)
    return {**stats, "skipped": False}


# --------------------------------------------------------------------------- the stage
def _clean_stale_temps(*folders: Path) -> None:
    for folder in folders:
        if folder.is_dir():
            for p in folder.glob(".*.tmp"):  # left by a killed run (atomic_path never renamed them)
                p.unlink(missing_ok=True)


def run_capfilt(params: Params, manifest: str | Path, captioner: Optional[str | Path], filter: str | Path,
                out_dir: str | Path, round: int = 0, calibration: Calibration = None,
                device: Optional[str] = None, root: str | Path = ".") -> StageStats:
    """CapFilt over every shard of ``manifest`` into ``out_dir`` (see the module docstring);
    ``root``: the work dir the manifest's shard references are relative to (the CLI's: where
    ``vlp`` runs; the flows': the layout's absolute root).

    ``captioner=None``: CapFilt without a captioner (the filter judges the web texts only; K = 0).

    ``stats.rows_in`` counts candidates (successful images x (1 + K)) and equals
    ``stats.rows_out``, the corpus rows; ``stats.extra["manifest_rows"]`` equals
    ``extra["images"]`` plus the ``skipped:<status>`` counts."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _clean_stale_temps(out_dir / CORPUS_DIR, out_dir / FEATS_DIR)
    stats = StageStats(stage="capfilt")
    table = read_manifest(manifest, (C.STATUS, C.SHARD))
    if params.capfilt.threshold_mode == "calibrated" and isinstance(calibration, (str, Path)):
        read_manifest(calibration, (C.KEY, C.CAPTION, C.STATUS, C.SHARD))  # readable before anything is written
    status_counts: dict[str, int] = {}
    for st in table[C.STATUS].to_pylist():
        status_counts[st] = status_counts.get(st, 0) + 1
    for st, n in sorted(status_counts.items()):
        if st != SUCCESS:
            stats.add(f"skipped:{st}", n)
    threshold = calibrate_threshold(params, filter, calibration, out_dir, root)
    images = 0
    ids: dict[str, str] = {}
    for shard in list_capfilt_shards(manifest):
        try:
            res = run_capfilt_shard(params, shard, captioner, filter, out_dir, round=round, calibration=threshold,
                                    device=device, root=root)
        except CapfiltShardError as exc:
            log.error("capfilt: shard %s failed: %s", shard.name, exc)
            stats.shards_failed.append(shard.name)
            stats.add("failed_shard_images", int(_shard_rows(shard).num_rows))
            stats.extra.setdefault("shard_errors", {})[shard.name] = str(exc)
            continue
        if res.get("skipped"):
            stats.shards_skipped += 1
        else:
            stats.shards_done += 1
        images += res["images"]
        stats.rows_in += res["rows_in"]
        stats.rows_out += res["rows_out"]
        for key, n in res["counts"].items():
            stats.add(key, n)
        ids = {k: res["fingerprint"][k] for k in ("captioner_id", "filter_id", "autocast")}
        stats.extra["vision_passes"] = stats.extra.get("vision_passes", 0) + int(res.get("vision_passes", 0))
    stats.seconds = time.perf_counter() - t0
    stats.extra.update({"manifest": as_written(manifest_path(manifest), root), "manifest_rows": table.num_rows, "images": images,
                        "candidates_per_image": 1 + (0 if captioner is None else params.capfilt.num_captions),
                        "captioner": None if captioner is None else as_written(captioner, root), "itm_threshold": threshold,
                        "threshold_mode": params.capfilt.threshold_mode, "round": round, **ids})
    stats.check().write(out_dir)
    return stats


__all__ = ["CapfiltShard", "CapfiltShardError", "calibrate_threshold", "calibration_scores", "check_keep_top",
           "list_capfilt_shards", "read_manifest", "run_capfilt", "run_capfilt_shard"]
