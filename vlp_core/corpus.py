"""A corpus on disk, as the CapFilt and features stages share it: its folder names, finding
its Parquet files, resolving the shard references of its rows, the embedding columns
(``FixedSizeList<float32, dim>``), and the ITC sidecar: how CapFilt hands the filter's
projections to the features stage.

It sits below both stages so that neither imports the other.

**The ITC sidecar** (``<capfilt>/feats/<shard>.parquet``, :func:`itc_sidecar_schema`):
CapFilt already computed the filter's ITC projection of every image and text it scored, so
it writes them (:class:`ItcSidecarWriter`, one row per corpus row, in corpus order, the
filter's model id in the file's metadata) and the features stage, reading them back with
:func:`read_itc_sidecar`, needs no second image pass.  The sidecar is CapFilt's output, not
the features format: only ``vlp_core/features`` writes ``features_schema`` rows (it builds them
from the sidecar and the corpus).  The writer lives here, not in ``vlp_core/features``,
because the features stage imports CapFilt's filter to compute embeddings itself when there
is no sidecar; CapFilt importing features would close a loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vlp_core.errors import VlpError
from vlp_core.io import ParquetReadError, atomic_path, read_parquet, read_parquet_schema
from vlp_core.layout import CORPUS_DIR, resolve  # CORPUS_DIR: a CapFilt stage's rows (CORPUS_SCHEMA)
from vlp_core.schema import C, itc_sidecar_schema

FEATS_DIR = "feats"  # the CapFilt stage's ITC sidecar: per-row filter projections (itc_sidecar_schema)
META_MODEL_ID = b"vlp.model_id"  # Parquet metadata: the model whose projections a file holds
META_AUTOCAST = b"vlp.autocast"  # Parquet metadata: "bf16" or "fp32", the arithmetic the projections came from


def corpus_folder(corpus_dir: str | Path) -> Path:
    """A CapFilt stage folder (holding ``corpus/``) or the corpus folder itself."""
    p = Path(corpus_dir)
    folder = p / CORPUS_DIR if (p / CORPUS_DIR).is_dir() else p
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        raise VlpError(f"{p}: no CapFilt corpus (no {CORPUS_DIR}/*.parquet)")
    return folder


def resolve_ref(ref: str, root: str | Path, base: Optional[Path] = None) -> str:
    """The file a shard reference (as a manifest or corpus row stores it) names: references are
    relative to the work dir ``root`` (:func:`vlp_core.layout.resolve`; never the current
    folder); failing that, to ``base`` (the manifest's or corpus file's folder), then to its
    parent, when the file is there.  Not found: the path under ``root`` (the reader's error names it)."""
    p = resolve(ref, root)
    if p.exists() or base is None:
        return str(p)
    for b in (base, base.parent):
        if (b / ref).exists():
            return str(b / ref)
    return str(p)


def fixed_list(arr: np.ndarray, valid: np.ndarray, dim: int) -> pa.Array:
    """``(n, dim)`` float32 rows -> ``FixedSizeList<float32, dim>`` with nulls where not ``valid``."""
    flat = pa.array(np.ascontiguousarray(arr, np.float32).reshape(-1), pa.float32())
    out = pa.FixedSizeListArray.from_arrays(flat, dim)
    if valid.all():
        return out
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))


def to_numpy_list(col: pa.ChunkedArray | pa.Array, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size list column -> ``((n, dim) float32, valid (n,))`` (zeros where null)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), bool)
    values = arr.values.slice(arr.offset * dim, n * dim).to_numpy(zero_copy_only=False)
    out = np.nan_to_num(np.asarray(values, np.float32)).reshape(n, dim)
    out[~valid] = 0.0
    return out, valid


# --------------------------------------------------------------------------- the ITC sidecar
class ItcSidecarWriter:
    """Streams CapFilt's per-row ITC projections to ``path`` (see the module docstring).

    ``with ItcSidecarWriter(path, model_id) as w: w.write(...)`` per batch.  The file appears
    atomically on a clean exit, and only once a batch has told the dimension (a shard whose
    every image failed leaves none; the features stage then computes what it needs)."""

    def __init__(self, path: str | Path, model_id: str, autocast: str = "fp32"):
        self.path, self.model_id, self.autocast = Path(path), model_id, autocast
        self._writer: Optional[pq.ParquetWriter] = None
        self._atomic: Any = None
        self._pending: list[tuple] = []  # batches before the dimension was known

    def __enter__(self) -> "ItcSidecarWriter":
        return self

    def write(self, rows: pa.Table, sha256: Sequence[Optional[str]], image_emb: Optional[np.ndarray],
              image_ok: np.ndarray, text_emb: Optional[np.ndarray], text_ok: np.ndarray) -> None:
        """One batch of corpus ``rows`` (their key, shard and candidate columns) with each row's
        image sha256, image and text projection ``(n, dim)`` and where those are valid;
        ``image_emb`` / ``text_emb`` None when the batch computed none (zeros are stored, null)."""
        if image_emb is None or text_emb is None:
            if self._writer is None:  # the dimension is not known yet
                self._pending.append((rows, sha256, image_ok, text_ok))
                return
            image_emb = text_emb = np.zeros((rows.num_rows, self._writer.schema.field(C.IMAGE_EMB).type.list_size),
                                            np.float32)
        dim = image_emb.shape[1]
        if self._writer is None:
            self._atomic = atomic_path(self.path)
            schema = itc_sidecar_schema(dim).with_metadata({META_MODEL_ID: self.model_id.encode(),
                                                            META_AUTOCAST: self.autocast.encode()})
            self._writer = pq.ParquetWriter(self._atomic.__enter__(), schema)
            for r, sh, iok, tok in self._pending:
                zeros = np.zeros((r.num_rows, dim), np.float32)
                self._write(r, sh, zeros, iok, zeros, tok)
            self._pending = []
        self._write(rows, sha256, image_emb, image_ok, text_emb, text_ok)

    def _write(self, rows: pa.Table, sha256: Sequence[Optional[str]], image_emb: np.ndarray, image_ok: np.ndarray,
               text_emb: np.ndarray, text_ok: np.ndarray) -> None:
        dim = image_emb.shape[1]
        self._writer.write_table(pa.table({
            C.KEY: rows[C.KEY], C.SHARD: rows[C.SHARD], C.CANDIDATE: rows[C.CANDIDATE],
            C.SHA256: pa.array(list(sha256), pa.string()),
            C.IMAGE_EMB: fixed_list(image_emb, image_ok, dim), C.TEXT_EMB: fixed_list(text_emb, text_ok, dim)},
            schema=self._writer.schema))

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._atomic.__exit__(exc_type, exc, tb)  # renamed into place, or (on an error) removed


def read_itc_sidecar(path: str | Path, corpus: pa.Table, model_id: str, autocast: str = "fp32") -> Optional[pa.Table]:
    """The ITC sidecar at ``path`` (:func:`itc_sidecar_schema` columns) when it holds
    ``model_id``'s projections, computed in ``autocast`` arithmetic (bf16 or fp32), of exactly
    ``corpus``'s rows (same keys and candidates, in order); None otherwise (a cache: a missing,
    unreadable, stale or foreign one is recomputed)."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        meta = read_parquet_schema(p).metadata or {}
        if meta.get(META_MODEL_ID, b"").decode() != model_id or meta.get(META_AUTOCAST, b"fp32").decode() != autocast:
            return None
        t = read_parquet(p, columns=[C.KEY, C.SHARD, C.CANDIDATE, C.SHA256, C.IMAGE_EMB, C.TEXT_EMB])
    except (ParquetReadError, KeyError):
        return None
    if t.num_rows != corpus.num_rows or t[C.KEY] != corpus[C.KEY] or t[C.CANDIDATE] != corpus[C.CANDIDATE]:
        return None
    return t


__all__ = ["CORPUS_DIR", "FEATS_DIR", "META_AUTOCAST", "META_MODEL_ID", "ItcSidecarWriter", "corpus_folder", "fixed_list",
           "read_itc_sidecar", "resolve_ref", "to_numpy_list"]
