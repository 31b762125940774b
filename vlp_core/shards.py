"""Reading images back out of ingest shards, by reference.

An *image reference* is the pair (``shard``, ``key``) stored in every manifest and corpus
row (see :mod:`vlp_core.schema`):

* ``shard`` ending in ``.tar`` is an img2dataset webdataset shard; the image is the member
  ``<key>.<ext>`` (jpg, png or webp).
* any other ``shard`` is a plain image file path (``key`` is then only a label).  Tests and
  the synthetic world use this form to train without an ingest pass.

Relative paths are relative to the current working directory (the repo root under DVC).
Decoding (:func:`vlp_core.images.decode_image`) failures are returned as reasons, never
raised, so callers can turn them into rows.
"""
from __future__ import annotations

import tarfile
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np

from vlp_core.errors import VlpError
from vlp_core.images import decode_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardError(VlpError, OSError):
    """A shard file that cannot be opened at all (missing, truncated, not a tar)."""


class ShardReader:
    """Random access to the images of webdataset tar shards, with a small LRU of indexes."""

    def __init__(self, max_open: int = 8):
        self._index: "OrderedDict[str, dict[str, tuple[int, int]]]" = OrderedDict()
        self._max_open = max_open

    def _members(self, shard: str) -> dict[str, tuple[int, int]]:
        if shard in self._index:
            self._index.move_to_end(shard)
            return self._index[shard]
        index: dict[str, tuple[int, int]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    stem, _, ext = m.name.rpartition(".")
                    if ext.lower() in IMAGE_EXTS:
                        index[stem] = (m.offset_data, m.size)
        except (OSError, tarfile.TarError, EOFError) as exc:
            raise ShardError(f"{shard}: cannot read shard ({exc.__class__.__name__}: {exc})") from None
        self._index[shard] = index
        if len(self._index) > self._max_open:
            self._index.popitem(last=False)
        return index

    def read_bytes(self, shard: str, key: str) -> bytes:
        if not str(shard).endswith(".tar"):
            return Path(shard).read_bytes()
        members = self._members(str(shard))
        if key not in members:
            raise KeyError(f"{shard}: no image for key {key}")
        offset, size = members[key]
        with open(shard, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise ShardError(f"{shard}: truncated at key {key}")
        return data

    def read(self, shard: str, key: str, size: Optional[int] = None) -> tuple[Optional[np.ndarray], Optional[str]]:
        """Return ``(HxWx3 uint8 array, None)`` or ``(None, reason)``."""
        try:
            data = self.read_bytes(shard, key)
        except ShardError as exc:
            return None, f"unreadable_shard: {exc}"
        except (KeyError, FileNotFoundError) as exc:
            return None, f"missing_image: {exc}"
        try:
            return decode_image(data, size), None
        except Exception as exc:  # PIL raises many types for corrupt data
            return None, f"decode_error: {exc.__class__.__name__}: {exc}"


def iter_images(
    refs: Iterable[tuple[str, str]], size: Optional[int] = None, reader: Optional[ShardReader] = None
) -> Iterator[tuple[str, str, Optional[np.ndarray], Optional[str]]]:
    """Yield ``(shard, key, array_or_None, reason_or_None)`` for each reference, in order."""
    reader = reader or ShardReader()
    for shard, key in refs:
        arr, reason = reader.read(shard, key, size)
        yield shard, key, arr, reason


def load_images(refs: Iterable[tuple[str, str]], size: int) -> tuple[np.ndarray, list[Optional[str]]]:
    """Decode every reference into one ``(N, size, size, 3)`` uint8 array (zeros where it failed)
    plus the list of failure reasons (None where it worked)."""
    refs = list(refs)
    out = np.zeros((len(refs), size, size, 3), dtype=np.uint8)
    reasons: list[Optional[str]] = []
    for i, (_, _, arr, reason) in enumerate(iter_images(refs, size)):
        if arr is not None:
            out[i] = arr
        reasons.append(reason)
    return out, reasons
