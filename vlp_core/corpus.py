"""A corpus on disk, as the CapFilt and features stages share it: its folder names, finding
its Parquet files, resolving the shard references of its rows, and the embedding columns
(``FixedSizeList<float32, dim>``) both stages write.

It sits below both stages so that neither imports the other.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from vlp_core.errors import VlpError

CORPUS_DIR = "corpus"  # a CapFilt stage's rows (CORPUS_SCHEMA)
FEATS_DIR = "feats"  # the CapFilt stage's per-row ITC features (features_schema, flags unset), reused by features
META_AUTOCAST = b"vlp.autocast"  # embeddings' Parquet metadata: "bf16" or "fp32", the arithmetic they came from


def corpus_folder(corpus_dir: str | Path) -> Path:
    """A CapFilt stage folder (holding ``corpus/``) or the corpus folder itself."""
    p = Path(corpus_dir)
    folder = p / CORPUS_DIR if (p / CORPUS_DIR).is_dir() else p
    if not folder.is_dir() or not any(folder.glob("*.parquet")):
        raise VlpError(f"{p}: no CapFilt corpus (no {CORPUS_DIR}/*.parquet)")
    return folder


def resolve_ref(ref: str, base: Path) -> str:
    """Shard references are relative to the working directory; fall back to the manifest's
    folder, then to its parent (an ingest folder's ``shards/``), when the file is there."""
    p = Path(ref)
    if p.is_absolute() or p.exists():
        return ref
    for b in (base, base.parent):
        if (b / p).exists():
            return str(b / p)
    return ref


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


__all__ = ["CORPUS_DIR", "FEATS_DIR", "META_AUTOCAST", "corpus_folder", "fixed_list", "resolve_ref", "to_numpy_list"]
