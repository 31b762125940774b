"""Duplicate detection over image embeddings and hashes, in bounded memory.

* :func:`exact_duplicates`: the first earlier image with the same sha256.
* :func:`near_duplicates`: for every row, the most similar EARLIER row by cosine, found with
  blocked matrix products: memory is ``O(block_size^2 + n * dim)``, never ``O(n^2)``.
  (At ``block_size`` 4096 a block of similarities is 64 MB of float32.)

Earlier = lower row index; the first occurrence of a group is never flagged, every later one
points back at an earlier one.

Ties: cosines that agree to ``TIE_DECIMALS`` decimals count as equal, and the EARLIEST of the
equally near rows is the one named.  Without this rule the choice between images that are all
(near) copies of each other turned on the last bit of float arithmetic, so another CPU's BLAS
kernels named another image (the cosine itself still agrees to 1e-6).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

TIE_DECIMALS = 5  # cosines equal to this many decimals are ties, won by the earlier row

def exact_duplicates(hashes: Sequence[Optional[str]]) -> np.ndarray:
    """``first[i]`` = index of the first row with the same hash when it is earlier than ``i``,
    else ``-1`` (also for a missing hash)."""
    seen: dict[str, int] = {}
    out = np.full(len(hashes), -1, np.int64)
    for i, h in enumerate(hashes):
        if h is None:
            continue
        j = seen.setdefault(h, i)
        if j != i:
            out[i] = j
    return out


@torch.no_grad()
def near_duplicates(emb: np.ndarray | torch.Tensor, block_size: int = 4096,
                    valid: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``emb (n, d)`` (L2-normalised here), ``(best_earlier_index, cosine)``:
    the most similar row with a smaller index (``-1`` / ``-inf`` for row 0 and invalid rows),
    the earliest of those whose cosines agree to ``TIE_DECIMALS`` decimals; the cosine is that
    row's.  ``valid (n,)`` masks rows without an embedding (they never match)."""
    e = torch.as_tensor(np.asarray(emb, np.float32) if not torch.is_tensor(emb) else emb, dtype=torch.float32)
    n = e.shape[0]
    best_idx = np.full(n, -1, np.int64)
    best_sim = np.full(n, -np.inf, np.float32)
    if n == 0:
        return best_idx, best_sim
    e = torch.nn.functional.normalize(e, dim=-1)
    ok = torch.ones(n, dtype=torch.bool) if valid is None else torch.as_tensor(np.asarray(valid, bool))
    bs = max(1, int(block_size))
    for r0 in range(0, n, bs):
        r1 = min(n, r0 + bs)
        q = e[r0:r1]  # (b, d)
        rows = torch.arange(r0, r1).view(-1, 1)
        top_sim = torch.full((r1 - r0,), -float("inf"))
        top_key = torch.full((r1 - r0,), -float("inf"))  # the cosine rounded to TIE_DECIMALS
        top_idx = torch.full((r1 - r0,), -1, dtype=torch.long)
        for c0 in range(0, r1, bs):  # only earlier (and the diagonal) blocks
            c1 = min(n, c0 + bs)
            s = q @ e[c0:c1].T  # (b, c): one bounded block of similarities
            cols = torch.arange(c0, c1).view(1, -1)
            s = s.masked_fill((cols >= rows) | ~ok[c0:c1].view(1, -1), -float("inf"))
            key = torch.round(s, decimals=TIE_DECIMALS)  # -inf stays -inf
            k, _ = key.max(dim=1)
            j = (key == k.view(-1, 1)).to(torch.uint8).argmax(dim=1)  # the first column reaching it
            v = s.gather(1, j.view(-1, 1)).view(-1)
            better = k > top_key  # strict: an earlier block keeps a tie
            top_key = torch.where(better, k, top_key)
            top_sim = torch.where(better, v, top_sim)
            top_idx = torch.where(better, j + c0, top_idx)
        top_sim[~ok[r0:r1]] = -float("inf")
        top_idx[~ok[r0:r1] | torch.isinf(top_sim)] = -1
        best_idx[r0:r1] = top_idx.numpy()
        best_sim[r0:r1] = top_sim.numpy()
    return best_idx, best_sim


__all__ = ["exact_duplicates", "near_duplicates"]
