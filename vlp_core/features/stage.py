"""``run_features``: embeddings and duplicate flags for every row of a CapFilt corpus.

Output, in ``out_dir``::

    embeddings/<shard>.parquet      features_schema: one row per corpus row (never dropped)
    embeddings/<shard>_stats.json   the shard's stage-cache entry (:class:`vlp_core.stagecache.Entry`:
                                    key from the model id, settings, autocast and the corpus file's digest)
    stats.json                      StageStats (duplicate counts in ``counts``)

Per row: the image's sha256, the model's ITC image projection (``image_embedding``, the
same for every candidate of an image), the candidate text's ITC projection
(``text_embedding``, null for an empty text), optionally a timm backbone's pooled features
(``features.backbone``: a timm model name, or ``name@weights.safetensors`` for local
weights), and the flags ``exact_dup`` (an earlier image has the same sha256), ``near_dup``
(an earlier image's embedding cosine is above ``features.near_dup_threshold``), ``dup_of``
and ``dup_cosine``.  "Earlier" is corpus order (shard name, then row).

One image pass: when the CapFilt stage already computed the filter's projections (its ITC
sidecar ``<capfilt>/feats/<shard>.parquet``, written by the same filter model; see
:mod:`vlp_core.corpus`), this stage builds its rows from them and no image is decoded again;
otherwise images are read from the ingest shards in bounded batches, decoded, preprocessed
and embedded by :mod:`vlp_core.images`.  Only this stage writes ``features_schema`` rows.
The filter runs under bf16 autocast where ``capfilt.precision`` says so (as in CapFilt, whose
projections are reused only when computed in the same arithmetic); a change of arithmetic
recomputes the shards.
Duplicate search is global (across shards) with blocked matrix products
(:mod:`vlp_core.features.dedup`), after every shard's embeddings are on disk.
"""
from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from vlp_core.capfilt.filter import ItmFilter
from vlp_core.config import Params, section_dict
from vlp_core.corpus import (FEATS_DIR, META_AUTOCAST, META_MODEL_ID, corpus_folder, fixed_list, read_itc_sidecar,
                             resolve_ref, to_numpy_list)
from vlp_core.errors import VlpError
from vlp_core.features.dedup import exact_duplicates, near_duplicates
from vlp_core.images import ImageSpec, decode_image
from vlp_core.io import StageStats, read_parquet, read_parquet_metadata, read_parquet_schema, write_parquet
from vlp_core.layout import as_written, resolve
from vlp_core.precision import resolved
from vlp_core.schema import C, features_schema, require_columns
from vlp_core.shards import ShardReader
from vlp_core.stagecache import Entry

log = logging.getLogger(__name__)

EMB_DIR = "embeddings"


def _corpus_files(corpus_dir: str | Path) -> tuple[Path, list[Path]]:
    folder = corpus_folder(corpus_dir)
    return folder, sorted(folder.glob("*.parquet"))


# --------------------------------------------------------------------------- backbone
class Backbone:
    """A timm model's pooled features (``num_classes=0``), from ``name`` or ``name@weights``
    (a weights file, relative to the work dir ``root``)."""

    def __init__(self, spec: str, device, root: str | Path = "."):
        import timm
        import torch

        name, _, weights = spec.partition("@")
        kw: dict[str, Any] = {"num_classes": 0}
        if weights:
            kw.update(pretrained=True, pretrained_cfg_overlay={"file": str(resolve(weights, root))})
        try:
            self.model = timm.create_model(name, **kw).to(device).eval()
        except Exception as exc:
            raise VlpError(f"features.backbone: cannot create timm model {spec!r} ({exc})") from None
        cfg = timm.data.resolve_data_config({}, model=self.model)
        self.spec = ImageSpec(int(cfg["input_size"][-1]), tuple(cfg["mean"]), tuple(cfg["std"]))
        self.device = device
        self.dim = int(self.model.num_features)
        self.torch = torch

    def __call__(self, images: np.ndarray) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.spec.preprocess(images, self.device)).float().cpu().numpy()


# --------------------------------------------------------------------------- one shard
def _from_sidecar(sidecar: pa.Table, corpus: pa.Table) -> pa.Table:
    """This stage's rows (flags unset) from CapFilt's ITC sidecar of ``corpus``."""
    n, dim = corpus.num_rows, sidecar.schema.field(C.IMAGE_EMB).type.list_size
    cols = {C.KEY: corpus[C.KEY], C.SHARD: corpus[C.SHARD], C.CANDIDATE: corpus[C.CANDIDATE],
            C.SOURCE: corpus[C.SOURCE], C.KEPT: corpus[C.KEPT], C.SHA256: sidecar[C.SHA256],
            C.IMAGE_EMB: sidecar[C.IMAGE_EMB], C.TEXT_EMB: sidecar[C.TEXT_EMB],
            C.EXACT_DUP: pa.array(np.zeros(n, bool)), C.NEAR_DUP: pa.array(np.zeros(n, bool)),
            C.DUP_OF: pa.nulls(n, pa.string()), C.DUP_COSINE: pa.nulls(n, pa.float32())}
    return pa.table(cols, schema=features_schema(dim))


def _compute_shard(params: Params, corpus: pa.Table, flt, backbone: Optional[Backbone], base: Path,
                   name: str, root: str | Path) -> tuple[pa.Table, dict[str, int]]:
    from tqdm.auto import tqdm

    fp = params.features
    n = corpus.num_rows
    keys, refs, texts = corpus[C.KEY].to_pylist(), corpus[C.SHARD].to_pylist(), corpus[C.TEXT].to_pylist()
    # distinct images in corpus order
    img_of_row = np.zeros(n, np.int64)
    images: dict[tuple, int] = {}
    for i, (r, k) in enumerate(zip(refs, keys)):
        img_of_row[i] = images.setdefault((r, k), len(images))
    img_list = list(images)
    m = len(img_list)
    dim = None
    img_emb: Optional[np.ndarray] = None
    bb_emb = np.zeros((m, backbone.dim), np.float32) if backbone else None
    img_ok = np.zeros(m, bool)
    shas: list[Optional[str]] = [None] * m
    reader = ShardReader()
    size = flt.backend.spec.size
    counts: dict[str, int] = {}
    bs = max(1, fp.batch_size)
    with tqdm(total=m, desc=f"features {name}", unit="img", disable=None, leave=False) as bar:
        for s in range(0, m, bs):
            e = min(m, s + bs)
            arrs, idx = [], []
            for j in range(s, e):
                ref, key = img_list[j]
                try:
                    data = reader.read_bytes(resolve_ref(ref, root, base), key)
                    shas[j] = hashlib.sha256(data).hexdigest()
                    arrs.append(decode_image(data, size))
                    idx.append(j)
                except Exception as exc:  # unreadable/corrupt: the rows stay, without embeddings
                    counts["image_unreadable"] = counts.get("image_unreadable", 0) + 1
                    log.debug("%s/%s: %s", ref, key, exc)
            if arrs:
                batch = np.stack(arrs)
                f = flt.image_feat(flt.encode(batch)).cpu().numpy()
                if img_emb is None:
                    dim = f.shape[1]
                    img_emb = np.zeros((m, dim), np.float32)
                img_emb[idx] = f
                img_ok[idx] = True
                if backbone is not None:
                    bb_emb[idx] = backbone(batch)
            bar.update(e - s)
    has_text = np.array([isinstance(t, str) and bool(t.strip()) for t in texts], bool)
    rows_t = np.flatnonzero(has_text)
    txt = flt.text_feat([texts[i] for i in rows_t]).cpu().numpy() if len(rows_t) else np.zeros((0, 0), np.float32)
    if dim is None:
        dim = txt.shape[1] if txt.size else int(flt.image_feat(flt.encode(np.zeros((1, size, size, 3), np.uint8))).shape[1])
        img_emb = np.zeros((m, dim), np.float32)
    txt_emb = np.zeros((n, dim), np.float32)
    if len(rows_t):
        txt_emb[rows_t] = txt
    row_ok = img_ok[img_of_row]
    cols: dict[str, Any] = {
        C.KEY: corpus[C.KEY], C.SHARD: corpus[C.SHARD], C.CANDIDATE: corpus[C.CANDIDATE],
        C.SOURCE: corpus[C.SOURCE], C.KEPT: corpus[C.KEPT],
        C.SHA256: pa.array([shas[j] for j in img_of_row], pa.string()),
        C.IMAGE_EMB: fixed_list(img_emb[img_of_row], row_ok, dim),
        C.TEXT_EMB: fixed_list(txt_emb, has_text, dim),
    }
    if backbone is not None:
        cols[C.BACKBONE_EMB] = fixed_list(bb_emb[img_of_row], row_ok, backbone.dim)
    cols.update({C.EXACT_DUP: pa.array(np.zeros(n, bool)), C.NEAR_DUP: pa.array(np.zeros(n, bool)),
                 C.DUP_OF: pa.nulls(n, pa.string()), C.DUP_COSINE: pa.nulls(n, pa.float32())})
    schema = features_schema(dim, backbone.dim if backbone else None)
    return pa.table(cols, schema=schema), counts


# --------------------------------------------------------------------------- dedup
def _flag_duplicates(files: list[Path], threshold: float, block_size: int) -> dict[str, int]:
    """Global exact + near duplicate flags, written back into each shard file (atomically)."""
    # one entry per distinct image, in corpus order
    img_keys: list[str] = []
    img_shas: list[Optional[str]] = []
    embs, oks = [], []
    per_file_img: list[np.ndarray] = []
    seen: dict[tuple, int] = {}
    for f in files:
        t = read_parquet(f, columns=[C.KEY, C.SHARD, C.SHA256, C.IMAGE_EMB])
        dim = t.schema.field(C.IMAGE_EMB).type.list_size
        e, ok = to_numpy_list(t[C.IMAGE_EMB], dim)
        rows_img = np.zeros(t.num_rows, np.int64)
        first_rows = []
        for i, (r, k) in enumerate(zip(t[C.SHARD].to_pylist(), t[C.KEY].to_pylist())):
            j = seen.get((r, k))
            if j is None:
                j = seen[(r, k)] = len(img_keys)
                img_keys.append(k)
                first_rows.append(i)
            rows_img[i] = j
        shas = t[C.SHA256].to_pylist()
        img_shas += [shas[i] for i in first_rows]
        embs.append(e[first_rows])
        oks.append(ok[first_rows])
        per_file_img.append(rows_img)
    if not img_keys:
        return {}
    emb = np.concatenate(embs)
    ok = np.concatenate(oks)
    exact = exact_duplicates(img_shas)
    near_idx, near_sim = near_duplicates(emb, block_size=block_size, valid=ok)
    is_near = near_sim > threshold
    dup_of = np.where(exact >= 0, exact, np.where(is_near, near_idx, -1))
    counts = {"images": len(img_keys), "exact_dup_images": int((exact >= 0).sum()),
              "near_dup_images": int(is_near.sum())}
    for f, rows_img in zip(files, per_file_img):
        t = read_parquet(f)
        schema = t.schema
        d = dup_of[rows_img]
        sim = near_sim[rows_img]
        t = t.set_column(schema.get_field_index(C.EXACT_DUP), schema.field(C.EXACT_DUP), pa.array(exact[rows_img] >= 0))
        t = t.set_column(schema.get_field_index(C.NEAR_DUP), schema.field(C.NEAR_DUP), pa.array(is_near[rows_img]))
        t = t.set_column(schema.get_field_index(C.DUP_OF), schema.field(C.DUP_OF),
                         pa.array([img_keys[j] if j >= 0 else None for j in d], pa.string()))
        t = t.set_column(schema.get_field_index(C.DUP_COSINE), schema.field(C.DUP_COSINE),
                         pa.array(np.where(np.isfinite(sim), sim, 0.0).astype(np.float32), mask=~np.isfinite(sim)))
        write_parquet(t.replace_schema_metadata(schema.metadata), f)
    return counts


# --------------------------------------------------------------------------- the stage
def run_features(params: Params, corpus_dir: str | Path, model_dir: str | Path, out_dir: str | Path,
                 device: Optional[str] = None, root: str | Path = ".") -> StageStats:
    """Embeddings + duplicate flags for every row of the corpus in ``corpus_dir`` (a CapFilt
    stage folder or its ``corpus/``), with the ITC projections of ``model_dir`` (a vlp
    checkpoint or an HF ``BlipForImageTextRetrieval`` folder).  Rows in == rows out.  The
    rows' image references are relative to the work dir ``root`` (the CLI's: where ``vlp`` runs)."""
    t0 = time.perf_counter()
    fp = params.features
    folder, files = _corpus_files(corpus_dir)
    for f in files:  # every input readable before the first output is written
        require_columns(read_parquet_schema(f), [C.KEY, C.SHARD, C.CANDIDATE, C.TEXT, C.SOURCE, C.KEPT], f)
    stage_dir = folder.parent
    out_dir = Path(out_dir)
    emb_dir = out_dir / EMB_DIR
    for p in emb_dir.glob(".*.tmp") if emb_dir.is_dir() else []:
        p.unlink(missing_ok=True)
    # the same arithmetic as CapFilt's filter (capfilt.precision), so reused and recomputed
    # embeddings of one corpus compare alike
    flt = ItmFilter(model_dir, device=device, batch_size=fp.batch_size, precision=params.capfilt.precision)
    arith = resolved(params.capfilt.precision, flt.backend.device)
    backbone = Backbone(fp.backbone, flt.backend.device, root) if fp.backbone else None
    fingerprint = {"model_id": flt.model_id, "features": section_dict(params, "features"), "autocast": arith}
    stats = StageStats(stage="features")
    outs = []
    for f in files:
        name = f.stem
        corpus = read_parquet(f)
        require_columns(corpus, [C.KEY, C.SHARD, C.CANDIDATE, C.TEXT, C.SOURCE, C.KEPT], f)
        corpus_sha = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
        entry = Entry("features", name, emb_dir, {**fingerprint, "corpus_sha": corpus_sha})
        out_path = emb_dir / f"{name}.parquet"
        stats.rows_in += corpus.num_rows
        if entry.cached(out_path) is not None:  # the stage cache decides: same inputs, output in place
            stats.shards_skipped += 1
            stats.rows_out += read_parquet_metadata(out_path).num_rows
            outs.append(out_path)
            continue
        sidecar = None if backbone else read_itc_sidecar(stage_dir / FEATS_DIR / f.name, corpus, flt.model_id, arith)
        if sidecar is not None:
            table = _from_sidecar(sidecar, corpus)
            counts = {"reused_capfilt_embeddings": corpus.num_rows}
        else:
            table, counts = _compute_shard(params, corpus, flt, backbone, f.parent.parent
                                           if f.parent.name == "corpus" else f.parent, name, root)
        table = table.replace_schema_metadata({META_MODEL_ID: flt.model_id.encode(), META_AUTOCAST: arith.encode()})
        write_parquet(table, out_path)
        entry.done({"rows": table.num_rows, "counts": counts})
        for k, v in counts.items():
            stats.add(k, v)
        stats.rows_out += table.num_rows
        stats.shards_done += 1
        outs.append(out_path)
    for k, v in _flag_duplicates(outs, fp.near_dup_threshold, fp.block_size).items():
        stats.counts[k] = v
    stats.seconds = time.perf_counter() - t0
    stats.extra = {"model_id": flt.model_id, "corpus": as_written(folder, root), "near_dup_threshold": fp.near_dup_threshold,
                   "backbone": fp.backbone, "autocast": arith}
    stats.check().write(out_dir)
    return stats


__all__ = ["EMB_DIR", "FEATS_DIR", "run_features"]
