"""Which pairs a training run holds out, by key alone.

``finetune.filter.holdout: 0.2`` keeps a fifth of the human pairs out of the filter's fine-tune,
and CapFilt calibrates its ITM threshold on exactly those pairs (capfilt/stage.py): a filter
fine-tuned for long memorises its own training pairs (their ITM scores crowd near 1), so a
threshold taken from them rejects most clean text it has not seen.

A pair is held out when the sha256 of its key falls in the lowest ``share`` of the hash range:
the same key is held out in every section and process (no RNG, no Python ``hash``), and a
smaller share holds out a subset of a larger one.
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

_SPAN = float(1 << 64)


def key_position(key: str) -> float:
    """Where ``key`` falls in [0, 1): the first 8 bytes of its sha256 over 2**64."""
    return int.from_bytes(hashlib.sha256(str(key).encode("utf-8")).digest()[:8], "big") / _SPAN


def held_out(keys: Iterable[str], share: float) -> np.ndarray:
    """A bool mask over ``keys``: True for the pairs a run with ``holdout: share`` does not train on."""
    keys = list(keys)
    if share <= 0:
        return np.zeros(len(keys), dtype=bool)
    return np.fromiter((key_position(k) < share for k in keys), dtype=bool, count=len(keys))


__all__ = ["held_out", "key_position"]
