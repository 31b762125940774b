"""``run_ingest``: URL list -> validation -> img2dataset shards -> manifest.

Layout under ``out_dir``::

    _work/download.parquet   the rows that passed validation (url, caption, row_index)
    _work/retry.parquet      the rows the last retry pass downloaded again (ingest.retry_failed)
    _work/fingerprint.json   what those rows and the download settings were (resume guard)
    shards/00000.tar         img2dataset webdataset shard (+ 00000.parquet, 00000_stats.json)
    manifest.parquet         MANIFEST_SCHEMA, exactly one row per input row, in input order (plus the
                             URL list's ``regions``, its box annotations, when it has them)
    stats.json               StageStats (rows per status)

img2dataset's ``<shard>_stats.json`` files are the done markers: with ``ingest.incremental``
a rerun after a crash downloads only the shards that lack one.  Each img2dataset row carries
the input ``row_index`` (``save_additional_columns``), which maps it back to its input row.

With ``ingest.retry_failed`` (``vlp ingest --retry-failed``) the rows that failed for a
transient reason (:mod:`vlp_core.ingest.retry`) are then downloaded again into *new* shards,
numbered after the highest finished one (img2dataset's ``extend`` mode), so existing shards,
their references and downstream done markers stay valid.  The manifest is always rebuilt from
all finished shards, a later shard's row replacing an earlier one's, so a retried row shows
its latest attempt (a plain rerun gives the same manifest).  The fingerprint covers the URL list
and settings only: a retry is the same list.
"""
from __future__ import annotations

import hashlib
import shutil
from collections import Counter
import signal
from pathlib import Path
from typing import Any, Optional

import img2dataset
import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.config import IngestParams, Params
from vlp_core.errors import VlpError
from vlp_core.io import StageStats, Timer, read_json, write_json, write_parquet
from vlp_core.ingest.reader import read_url_list
from vlp_core.ingest.retry import NO_RESULT, transient_rows
from vlp_core.ingest.validate import Verdicts, allowed_hosts, validate_rows
from vlp_core.ingest.workers import guarded_download
from vlp_core.layout import SHARDS_DIR, as_written
from vlp_core.schema import INGEST_STATUSES, MANIFEST_SCHEMA, C, manifest_schema

WORK_DIR = "_work"


class IngestError(VlpError, RuntimeError):
    """An ingest run that cannot go on (e.g. the output folder holds another list's shards)."""


def img2dataset_kwargs(ip: IngestParams) -> dict[str, Any]:
    """The download settings that come from params (shared with bench/ingest.py's bare run)."""
    if ip.output_format not in ("webdataset", "files"):
        raise IngestError(f"ingest.output_format={ip.output_format!r} is not supported by the manifest "
                          "(use webdataset or files)")
    return dict(
        image_size=ip.image_size,
        resize_mode=ip.resize_mode,
        encode_format=ip.encode_format,
        encode_quality=ip.encode_quality,
        output_format=ip.output_format,
        number_sample_per_shard=ip.number_sample_per_shard,
        processes_count=ip.processes_count,
        thread_count=ip.thread_count,
        timeout=ip.timeout,
        retries=ip.retries,
        disallowed_header_directives=list(ip.disallowed_header_directives),
        distributor=ip.distributor,
        enable_wandb=False,
        extract_exif=False,
        compute_hash="sha256",
    )


def _fingerprint(table: pa.Table, ip: IngestParams) -> dict[str, Any]:
    h = hashlib.sha256()
    for col in table.columns:
        for chunk in col.chunks:
            for buf in chunk.buffers():
                if buf is not None:
                    h.update(buf)
    settings = {k: v for k, v in img2dataset_kwargs(ip).items()
                if k in ("image_size", "resize_mode", "encode_format", "encode_quality", "output_format",
                         "number_sample_per_shard")}
    return {"rows": table.num_rows, "sha256": h.hexdigest(), "settings": settings}


def _guard_resume(work: Path, shards: Path, fp: dict[str, Any], incremental: bool) -> None:
    fp_path = work / "fingerprint.json"
    if not incremental and shards.exists():
        shutil.rmtree(shards)  # start over
    has_shards = shards.exists() and any(shards.glob("*_stats.json"))
    if incremental and has_shards and fp_path.exists() and read_json(fp_path) != fp:
        raise IngestError(f"{shards}: holds shards of a different URL list or settings; "
                          "use a new --out or set -S ingest.incremental=false to start over")
    write_json(fp, fp_path)


def _run_img2dataset(url_list: Path, shards: Path, ip: IngestParams, mode: str = "incremental") -> None:
    """Download ``url_list`` into ``shards``.  ``mode="incremental"`` (shards 0, 1, ... of the
    list; those with a done marker are skipped) or ``"extend"`` (new shards numbered after the
    highest finished one: the retry pass)."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        with guarded_download(allowed_hosts(ip), ip.max_image_pixels):  # checked in every download process
            img2dataset.download(
                url_list=str(url_list),
                output_folder=str(shards),
                input_format="parquet",
                url_col=C.URL,
                caption_col=C.CAPTION,
                save_additional_columns=[C.ROW],
                # never img2dataset's "overwrite": when ingest.incremental is off _guard_resume has
                # emptied the folder, and 1.47's "overwrite" deletes its _tmp folder and loops forever
                incremental_mode=mode,
                **img2dataset_kwargs(ip),
            )
    except SystemExit as exc:  # img2dataset's SIGINT handler exits 0; that is an interruption
        raise KeyboardInterrupt from exc
    finally:
        signal.signal(signal.SIGINT, previous)


def _shard_name(shard_id: int) -> str:
    return f"{shard_id:05d}"  # img2dataset's oom_shard_count=5


def _done(shards: Path, name: str) -> bool:
    return (shards / f"{name}_stats.json").exists()


def _shard_ref(shards_as_given: Path, shard_name: str, key: str, ip: IngestParams) -> str:
    if ip.output_format == "webdataset":
        return str(shards_as_given / f"{shard_name}.tar")
    return str(shards_as_given / shard_name / f"{key}.{ip.encode_format}")


def _collect(shards: Path) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Rows of every finished img2dataset shard by input row_index, and the names of the shards
    that did not finish.  Shards are read in name order and a later shard's row replaces an
    earlier one's: a retry shard (numbered after the others) holds a row's latest attempt."""
    found: dict[int, dict[str, Any]] = {}
    failed: list[str] = []
    for pq_path in sorted(shards.glob("*.parquet")):
        name = pq_path.stem
        if not _done(shards, name):
            failed.append(name)
            continue
        t = pq.read_table(pq_path, columns=[C.ROW, "key", "status", "error_message", "width", "height", "sha256"])
        for r in t.to_pylist():
            r["shard_name"] = name
            found[int(r[C.ROW])] = r
    return found, failed


def _manifest(verdicts: Verdicts, found: dict[int, dict[str, Any]], out_dir: Path, ip: IngestParams,
              root: str | Path, regions: Optional[pa.ChunkedArray] = None) -> pa.Table:
    """One row per input row, in input order: the validation verdict, else the shard result
    (its shard reference relative to the work dir ``root``, :func:`vlp_core.layout.as_written`),
    and the row's ``regions`` as given, when the URL list has them."""
    shards_as_written = Path(as_written(out_dir / SHARDS_DIR, root))
    cols: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
    for i in range(len(verdicts.urls)):
        status, reason = verdicts.status[i], verdicts.reason[i]
        key = shard = sha = None
        width = height = None
        if status is None:
            r: Optional[dict[str, Any]] = found.get(i)
            if r is None:
                status, reason = "failed_to_download", f"{NO_RESULT} (its shard failed; rerun to retry)"
            else:
                status, key = r["status"], r["key"]
                if status == "success":
                    shard = _shard_ref(shards_as_written, r["shard_name"], key, ip)
                    width, height, sha = r["width"], r["height"], r["sha256"]
                else:
                    reason = r["error_message"] or status
                if status not in INGEST_STATUSES:  # pragma: no cover - img2dataset's closed set
                    status, reason = "failed_to_download", f"img2dataset status {r['status']}: {reason}"
        cols[C.ROW].append(i)
        cols[C.URL].append(verdicts.urls[i])
        cols[C.CAPTION].append(verdicts.captions[i])
        cols[C.STATUS].append(status)
        cols[C.REASON].append(reason)
        cols[C.KEY].append(key)
        cols[C.SHARD].append(shard)
        cols[C.WIDTH].append(width)
        cols[C.HEIGHT].append(height)
        cols[C.SHA256].append(sha)
    if regions is None:
        return pa.table(cols, schema=MANIFEST_SCHEMA)
    return pa.table({**cols, C.REGIONS: regions}, schema=manifest_schema(regions=True))


def _retry_pass(manifest: pa.Table, shards: Path, work: Path, ip: IngestParams,
                unfinished: list[str]) -> tuple[dict[str, Any], list[int]]:
    """Download the rows of ``manifest`` that failed for a transient reason
    (:func:`vlp_core.ingest.retry.is_transient`) into new shards, numbered after every finished
    one; no existing shard is rewritten.  Returns what it did and the retried row indices."""
    rows = transient_rows(manifest.column(C.STATUS).to_pylist(), manifest.column(C.REASON).to_pylist())
    info: dict[str, Any] = {"retried": 0, "transient": len(rows), "shards": []}
    if not rows:
        return info, []
    if unfinished:  # a retry shard must never take the number of a shard still to be finished
        info["skipped"] = (f"shards {', '.join(unfinished)} of the URL list did not finish; "
                           "rerun the ingest to finish them before retrying")
        return info, []
    before = {p.name for p in shards.glob("*_stats.json")}
    retry_list = work / "retry.parquet"
    write_parquet(manifest.take(rows).select([C.URL, C.CAPTION, C.ROW]), retry_list)
    _run_img2dataset(retry_list, shards, ip, mode="extend")
    info["retried"] = len(rows)
    info["shards"] = sorted(p.name[: -len("_stats.json")] for p in shards.glob("*_stats.json") if p.name not in before)
    return info, rows


def run_ingest(params: Params, urls: str | Path, out_dir: str | Path, root: str | Path = ".") -> StageStats:
    """Ingest the URL list ``urls`` into ``out_dir`` (see the module doc); returns StageStats
    with ``counts`` = rows per manifest status.  ``rows_in == rows_out`` always.  With
    ``ingest.retry_failed`` the rows that failed for a transient reason are then downloaded
    again into new shards and merged into the manifest (``extra["retry"]``).  The manifest's
    shard references are written relative to the work dir ``root`` (the CLI's: where ``vlp``
    runs, so they read as ``--out`` was given)."""
    ip = params.ingest
    out_dir = Path(out_dir)
    shards, work = out_dir / SHARDS_DIR, out_dir / WORK_DIR
    stats = StageStats(stage="ingest")
    with Timer() as timer:
        table = read_url_list(urls, ip)
        n = table.num_rows
        verdicts = validate_rows(table.column(C.URL).to_pylist(), table.column(C.CAPTION).to_pylist(), ip)
        todo = [i for i in range(n) if verdicts.status[i] is None]
        dl = pa.table({
            C.URL: pa.array([verdicts.urls[i] for i in todo], pa.string()),
            C.CAPTION: pa.array([verdicts.captions[i] for i in todo], pa.string()),
            C.ROW: pa.array(todo, pa.int64()),
        })
        fp = _fingerprint(dl, ip)
        work.mkdir(parents=True, exist_ok=True)
        _guard_resume(work, shards, fp, ip.incremental)
        n_shards = -(-len(todo) // ip.number_sample_per_shard)
        base = [_shard_name(s) for s in range(n_shards)]  # the list's own shards; retry shards follow
        missing = [s for s in base if not _done(shards, s)]
        if missing:
            dl_path = work / "download.parquet"
            write_parquet(dl, dl_path)
            _run_img2dataset(dl_path, shards, ip)
        unfinished = [s for s in base if not _done(shards, s)]
        found, failed = _collect(shards)
        regions = table.column(C.REGIONS) if C.REGIONS in table.column_names else None
        manifest = _manifest(verdicts, found, out_dir, ip, root, regions)
        if ip.retry_failed:
            retry, retried = _retry_pass(manifest, shards, work, ip, unfinished)
            if retried:
                found, failed = _collect(shards)
                manifest = _manifest(verdicts, found, out_dir, ip, root, regions)
            ok = manifest.column(C.STATUS).to_pylist()
            retry["recovered"] = sum(ok[i] == "success" for i in retried)
            retry["still_failed"] = retry["retried"] - retry["recovered"]
            stats.extra["retry"] = retry
        write_parquet(manifest, out_dir / "manifest.parquet")
        stats.shards_skipped = n_shards - len(missing)
        stats.shards_done = len(missing) - len(unfinished) + len(stats.extra.get("retry", {}).get("shards", []))
        stats.shards_failed = failed
        reasons: Counter[tuple[str, str]] = Counter()
        for status, reason in zip(manifest.column(C.STATUS).to_pylist(), manifest.column(C.REASON).to_pylist()):
            stats.add(status)
            if status != "success":
                reasons[(status, reason or "")] += 1
    stats.rows_in = n
    stats.rows_out = manifest.num_rows
    stats.seconds = round(timer.seconds, 3)
    stats.extra.update({"urls": as_written(urls, root), "downloaded_rows": len(todo), "shards": n_shards,
                        "images_per_s": round(stats.counts.get("success", 0) / max(timer.seconds, 1e-9), 1),
                        "top_reasons": [[st, r, k] for (st, r), k in reasons.most_common(8)]})
    stats.check().write(out_dir)
    return stats


def summary_table(stats: StageStats) -> str:
    """A small text table: rows per status, with shares."""
    total = max(stats.rows_in, 1)
    lines = [f"{'status':<20} {'rows':>8} {'share':>7}", "-" * 37]
    for status in INGEST_STATUSES:
        n = stats.counts.get(status, 0)
        lines.append(f"{status:<20} {n:>8} {100.0 * n / total:>6.1f}%")
    lines.append("-" * 37)
    lines.append(f"{'total':<20} {stats.rows_out:>8} (rows in {stats.rows_in})")
    lines.append(f"shards: {stats.shards_done} done, {stats.shards_skipped} resumed from an earlier run"
                 + (f", {len(stats.shards_failed)} failed" if stats.shards_failed else "")
                 + f"; {stats.seconds:.1f} s")
    retry = stats.extra.get("retry")
    if retry is not None:
        if retry.get("skipped"):
            lines.append(f"retry: {retry['transient']} transient failures not retried: {retry['skipped']}")
        else:
            lines.append(f"retry: {retry['retried']} transient failures downloaded again, {retry['recovered']} "
                         f"recovered, {retry['still_failed']} still failing"
                         + (f" (new shards {', '.join(retry['shards'])})" if retry["shards"] else ""))
    top = stats.extra.get("top_reasons") or []
    if top:
        lines.append("most frequent reasons:")
        lines.extend(f"  {k:>7}  {st:<18} {r[:90]}" for st, r, k in top)
    return "\n".join(lines)


__all__ = ["run_ingest", "summary_table", "img2dataset_kwargs", "IngestError"]
