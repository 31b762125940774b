"""Image-text pairs for training and evaluation.

:func:`load_pairs` reads pair *sources* into one table (``key, shard, text, source, url,
regions``; ``regions``: the row's box annotations with their phrases, X-VLM's region data, null
where the source has none -- web rows, CapFilt corpora):

* an ingest **manifest** (``manifest.parquet``, or the ingest folder holding it): rows with
  ``status == "success"``; ``caption`` becomes ``text``; ``source`` is the name given; its
  ``regions`` when it has them (the synthetic world's human split, via the ingest);
* a CapFilt **corpus** (a ``CORPUS_SCHEMA`` Parquet file, a folder of them, or a stage folder
  holding ``corpus/``): rows with ``kept == true``; each row keeps its own ``source``;
* a synthetic world **URL list** (``W/<split>.parquet`` with ``url_path, caption``): the image
  is read straight from ``W/www/<url_path>`` (no ingest needed; for tests and bench/).

:class:`PairData` decodes every distinct image ONCE into a ``(N, H, W, 3)`` uint8 array in
memory (48 px images: 20k images = 140 MB).  Pairs whose image fails to decode, or whose
text is empty, are skipped and counted by reason.  :class:`PairDataset` yields
``(pixels uint8 (H, W, 3), text, image_idx)``; :func:`epoch_batches` gives the
deterministic (seed, epoch, rank)-keyed batch order that makes resuming exact.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.utils.data

from vlp_core.corpus import resolve_ref
from vlp_core.errors import VlpError
from vlp_core.io import read_parquet, read_parquet_schema
from vlp_core.layout import CORPUS_DIR, MANIFEST_FILE
from vlp_core.schema import REGIONS_TYPE, SOURCES, SUCCESS, C, require_columns
from vlp_core.shards import load_images

PAIR_COLUMNS = (C.KEY, C.SHARD, C.TEXT, C.SOURCE, C.URL, C.REGIONS)
PAIR_SCHEMA = pa.schema([pa.field(c, pa.string()) for c in PAIR_COLUMNS[:-1]] + [pa.field(C.REGIONS, REGIONS_TYPE)])
WORLD_URL_COL = "url_path"


class DataError(VlpError, ValueError):
    """A training source that cannot be read (names the path)."""


Source = tuple[str | Path, str]


def parse_source(spec: str, default: str = "web") -> tuple[str, str]:
    """``"path[:source]"`` -> ``(path, source)``; the suffix is taken only when it is one of
    :data:`vlp_core.schema.SOURCES` (so paths with colons still work)."""
    head, sep, tail = str(spec).rpartition(":")
    if sep and head and tail in SOURCES:
        return head, tail
    return str(spec), default


def _resolve_shards(shards: Sequence[Optional[str]], root: str | Path, base: Path) -> list[Optional[str]]:
    """Each row's shard reference as the file to read (:func:`vlp_core.corpus.resolve_ref`:
    relative to the work dir ``root``, else to the source file's folder ``base``), once per
    distinct reference."""
    cache: dict[str, str] = {}
    out: list[Optional[str]] = []
    for s in shards:
        if s is not None and s not in cache:
            cache[s] = resolve_ref(s, root, base)
        out.append(None if s is None else cache[s])
    return out


def _pairs_table(key, shard, text, source, url, regions=None) -> pa.Table:
    regions = pa.nulls(len(key), REGIONS_TYPE) if regions is None else regions
    return pa.table({C.KEY: pa.array(key, pa.string()), C.SHARD: pa.array(shard, pa.string()),
                     C.TEXT: pa.array(text, pa.string()), C.SOURCE: pa.array(source, pa.string()),
                     C.URL: pa.array(url, pa.string()), C.REGIONS: regions}, schema=PAIR_SCHEMA)


def _regions_of(table: pa.Table, path: Path):
    """``table``'s regions column (cast to :data:`REGIONS_TYPE`), or None when it has none."""
    if C.REGIONS not in table.column_names:
        return None
    try:
        return table[C.REGIONS].cast(REGIONS_TYPE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(f"{path}: column {C.REGIONS!r} is {table.schema.field(C.REGIONS).type}, "
                        f"expected {REGIONS_TYPE} ({exc})") from None


def _read_manifest(path: Path, name: str, root: str | Path) -> pa.Table:
    table = read_parquet(path)
    require_columns(table, [C.KEY, C.SHARD, C.CAPTION, C.STATUS, C.URL], path)
    table = table.filter(pc.equal(table[C.STATUS], SUCCESS))
    shards = _resolve_shards(table[C.SHARD].to_pylist(), root, path.parent)
    return _pairs_table(table[C.KEY].to_pylist(), shards, table[C.CAPTION].to_pylist(),
                        [name] * table.num_rows, table[C.URL].to_pylist(), _regions_of(table, path))


def _read_corpus_file(path: Path, root: str | Path) -> pa.Table:
    table = read_parquet(path)
    require_columns(table, [C.KEY, C.SHARD, C.TEXT, C.SOURCE, C.KEPT], path)
    table = table.filter(pc.fill_null(table[C.KEPT], False))
    shards = _resolve_shards(table[C.SHARD].to_pylist(), root, path.parent)
    urls = table[C.URL].to_pylist() if C.URL in table.column_names else [None] * table.num_rows
    return _pairs_table(table[C.KEY].to_pylist(), shards, table[C.TEXT].to_pylist(),
                        table[C.SOURCE].to_pylist(), urls)


def _read_world_list(path: Path, name: str) -> pa.Table:
    table = read_parquet(path)
    require_columns(table, [WORLD_URL_COL, C.CAPTION], path)
    www = path.parent / "www"
    url_paths = table[WORLD_URL_COL].to_pylist()
    shards = [str(www / u.lstrip("/")) for u in url_paths]
    keys = [Path(u).stem for u in url_paths]
    return _pairs_table(keys, shards, table[C.CAPTION].to_pylist(), [name] * table.num_rows, url_paths,
                        _regions_of(table, path))


def _read_parquet(path: Path, name: str, root: str | Path) -> pa.Table:
    names = read_parquet_schema(path).names
    if C.KEPT in names:
        return _read_corpus_file(path, root)
    if C.STATUS in names:
        return _read_manifest(path, name, root)
    if WORLD_URL_COL in names:
        return _read_world_list(path, name)
    raise DataError(f"{path}: not a manifest (needs {C.STATUS}), a corpus (needs {C.KEPT}) "
                    f"or a world URL list (needs {WORLD_URL_COL}); has: {', '.join(names)}")


def read_source(path: str | Path, name: str = "web", root: str | Path = ".") -> pa.Table:
    """The pairs of one source (see the module docstring for what ``path`` may be); the shard
    references of manifests and corpora are relative to the work dir ``root``."""
    path = Path(path)
    if name not in SOURCES:
        raise DataError(f"{path}: unknown source name {name!r} (one of {', '.join(SOURCES)})")
    if path.is_file():
        return _read_parquet(path, name, root)
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return _read_manifest(path / MANIFEST_FILE, name, root)
        folder = path / CORPUS_DIR if (path / CORPUS_DIR).is_dir() else path
        files = sorted(folder.glob("*.parquet"))
        if not files:
            raise DataError(f"{path}: no {MANIFEST_FILE}, no {CORPUS_DIR}/ and no Parquet files")
        return pa.concat_tables([_read_parquet(f, name, root) for f in files])
    raise DataError(f"{path}: no such file or folder")


def source_files(path: str | Path) -> list[Path]:
    """The Parquet files :func:`read_source` reads for ``path`` (sorted; none if missing)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        if (path / MANIFEST_FILE).is_file():
            return [path / MANIFEST_FILE]
        folder = path / CORPUS_DIR if (path / CORPUS_DIR).is_dir() else path
        return sorted(folder.glob("*.parquet"))
    return []


def load_pairs(sources: Iterable[Source], root: str | Path = ".") -> pa.Table:
    """All pairs of ``sources`` (``(path, source_name)`` each), in order, as one table with
    columns ``key, shard, text, source, url`` (``shard``: the file to read, resolved against
    the work dir ``root``; the CLI's: where ``vlp`` runs)."""
    tables = [read_source(p, n, root) for p, n in sources]
    if not tables:
        raise DataError("no training sources given")
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- decoded data
@dataclass
class PairData:
    """Pairs whose image decoded, with every distinct image decoded once.

    ``images``: (n_images, H, W, 3) uint8.  ``image_idx``: (n_pairs,) int64 row of
    ``images`` for each pair.  ``rows``: (n_pairs,) int64 row of the input table.
    """

    images: np.ndarray
    image_idx: np.ndarray
    texts: list[str]
    rows: np.ndarray
    table: pa.Table  # the used pairs (same order as texts)
    rows_in: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    _regions: Optional[list] = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def regions(self) -> list[Optional[list[dict]]]:
        """Each pair's region annotations (``[{phrase, box}, ...]``) or None, cached."""
        if self._regions is None:
            self._regions = self.table[C.REGIONS].to_pylist()
        return self._regions

    @property
    def n_with_regions(self) -> int:
        """Pairs that have at least one region annotation."""
        return sum(1 for r in self.regions if r)

    def image_urls(self) -> list[Optional[str]]:
        """The URL of each decoded image (the first pair that used it)."""
        urls: list[Optional[str]] = [None] * len(self.images)
        for u, i in zip(self.table[C.URL].to_pylist(), self.image_idx.tolist()):
            if urls[i] is None:
                urls[i] = u
        return urls


def decode_pairs(table: pa.Table, image_size: int, min_text_chars: int = 1) -> PairData:
    """Decode the images of ``table`` (from :func:`load_pairs`) once each; skip (and count)
    pairs whose image failed or whose text is empty."""
    keys = table[C.KEY].to_pylist()
    shards = table[C.SHARD].to_pylist()
    texts = [(t or "").strip() for t in table[C.TEXT].to_pylist()]
    skipped: dict[str, int] = {}
    ref_index: dict[tuple[str, str], int] = {}
    refs: list[tuple[str, str]] = []
    pair_ref: list[int] = []  # per input row: index into refs, or -1 (empty text)
    for shard, key, text in zip(shards, keys, texts):
        if len(text) < min_text_chars:
            skipped["empty_text"] = skipped.get("empty_text", 0) + 1
            pair_ref.append(-1)
            continue
        ref = (str(shard), str(key))
        if ref not in ref_index:
            ref_index[ref] = len(refs)
            refs.append(ref)
        pair_ref.append(ref_index[ref])
    arrays, reasons = load_images(refs, image_size) if refs else (np.zeros((0, image_size, image_size, 3), np.uint8), [])
    ok = np.array([r is None for r in reasons], dtype=bool)
    new_id = np.full(len(refs), -1, dtype=np.int64)
    new_id[ok] = np.arange(int(ok.sum()))
    used_rows, used_idx, used_texts = [], [], []
    for row, (r, text) in enumerate(zip(pair_ref, texts)):
        if r < 0:
            continue
        if not ok[r]:
            kind = str(reasons[r]).split(":", 1)[0]
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        used_rows.append(row)
        used_idx.append(int(new_id[r]))
        used_texts.append(text)
    rows = np.asarray(used_rows, dtype=np.int64)
    return PairData(images=np.ascontiguousarray(arrays[ok]), image_idx=np.asarray(used_idx, dtype=np.int64),
                    texts=used_texts, rows=rows, table=table.take(pa.array(rows, pa.int64())),
                    rows_in=table.num_rows, skipped=skipped)


# --------------------------------------------------------------------------- torch side
class PairDataset(torch.utils.data.Dataset):
    """``(pixels uint8 (H, W, 3), text, image_idx)`` per pair of a :class:`PairData`."""

    def __init__(self, data: PairData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        j = int(self.data.image_idx[i])
        return torch.from_numpy(self.data.images[j]), self.data.texts[i], j


def collate_pairs(batch: Sequence[tuple]):
    """-> ``(pixels uint8 (B, H, W, 3), texts list[str], image_idx int64 (B,))``."""
    pixels = torch.stack([b[0] for b in batch])
    return pixels, [b[1] for b in batch], torch.tensor([b[2] for b in batch], dtype=torch.long)


def get_batch(dataset: PairDataset, indices: Sequence[int]):
    """Collate the pairs at ``indices`` (fast path: one fancy-index into the image array)."""
    idx = np.asarray(indices, dtype=np.int64)
    img = dataset.data.image_idx[idx]
    pixels = torch.from_numpy(dataset.data.images[img])  # (B, H, W, 3) uint8
    return pixels, [dataset.data.texts[i] for i in idx.tolist()], torch.from_numpy(img)


def batch_regions(dataset: PairDataset, indices: Sequence[int]) -> list[Optional[list[dict]]]:
    """The region annotations of the pairs at ``indices`` (same order as :func:`get_batch`'s
    texts): a list of ``{phrase, box}`` per pair, or None where it has none."""
    regions = dataset.data.regions
    return [regions[i] for i in np.asarray(indices, dtype=np.int64).tolist()]


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> list[np.ndarray]:
    """This rank's batches for ``epoch``: a ``DistributedSampler`` shuffle keyed by
    (seed, epoch), split over ranks, full batches only.  ``batch_size`` is per rank."""
    from torch.utils.data import DistributedSampler

    if n < batch_size * world_size:
        raise DataError(f"only {n} usable pairs: fewer than one batch ({batch_size} x {world_size} ranks)")
    sampler = DistributedSampler(range(n), num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = np.fromiter(iter(sampler), dtype=np.int64)
    n_batches = len(order) // batch_size
    return [order[b * batch_size:(b + 1) * batch_size] for b in range(n_batches)]


__all__ = ["PAIR_COLUMNS", "DataError", "PairData", "PairDataset", "batch_regions", "collate_pairs", "decode_pairs",
           "epoch_batches", "get_batch", "load_pairs", "parse_source", "read_source", "source_files"]
