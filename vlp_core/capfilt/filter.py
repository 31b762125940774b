"""The filter: ITC similarity and ITM match probability for (image, text) candidates
(BLIP's CapFilt "Filt").

Backends: vlp_core checkpoints and local Hugging Face ``BlipForImageTextRetrieval`` folders
(:mod:`vlp_core.capfilt.backend`).  Scores are computed from image embeddings, so the image
is encoded once however many candidate texts it has; the optional ITC pre-screen skips the
(costlier, cross-attending) ITM pass for candidates whose ITC is far too low.  The passes run
under bf16 autocast where ``precision`` (``capfilt.precision``) says so; scores come back float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from vlp_core.capfilt.backend import Backend, BackendRole
from vlp_core.images import autocast


LENGTH_BUCKET = 64  # texts per forward after sorting by length (less padding, still batched)


def unit(x: torch.Tensor) -> torch.Tensor:
    """float32 rows of norm 1: features normalised under bf16 autocast come back bf16, whose
    norms are 1 only to ~1e-3; ITC cosines and stored embeddings need them unit in float32."""
    return torch.nn.functional.normalize(x.float(), dim=-1)


def length_chunks(rows: np.ndarray, texts: Sequence[str], size: int) -> list[np.ndarray]:
    """``rows`` sorted by their text's length and cut into chunks of at most ``size``, so each
    forward pads to a similar length (web alt-texts and long synthetic captions apart)."""
    if len(rows) == 0:
        return []
    order = rows[np.argsort([len(texts[i] or "") for i in rows], kind="stable")]
    return [order[i:i + size] for i in range(0, len(order), max(1, size))]


class ItmFilter(BackendRole):
    """``ItmFilter(model_dir).scores(image_embeds, texts) -> (itc, itm)``."""

    role = "filter"

    def __init__(self, model_dir: str | Path, device: Optional[str] = None, backend: Optional[Backend] = None,
                 batch_size: int = 256, precision: str = "auto"):
        super().__init__(model_dir, device, backend, precision)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features ``(B, E)`` (float32)."""
        with autocast(self.backend.device, self.precision):
            return unit(self.backend.image_feat(image_embeds))

    @torch.no_grad()
    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised ITC text features ``(N, E)`` (float32), in batches."""
        n = len(texts)
        out: Optional[torch.Tensor] = None
        with autocast(self.backend.device, self.precision):
            for rows in length_chunks(np.arange(n), texts, min(self.batch_size, LENGTH_BUCKET)):
                f = unit(self.backend.text_feat([texts[i] for i in rows]))
                if out is None:
                    out = torch.zeros(n, f.shape[1], device=f.device)
                out[torch.as_tensor(rows, device=f.device)] = f
        return torch.zeros(0, 0) if out is None else out

    @torch.no_grad()
    def scores(self, image_embeds: torch.Tensor, texts: Sequence[str], image_index: Optional[Sequence[int]] = None,
               itc_prescreen: Optional[float] = None, return_feats: bool = False):
        """ITC cosine and ITM probability for each text, ``(N,)`` float32 each.

        ``image_embeds (B, 1 + N_tok, Dv)``; text ``i`` is paired with image
        ``image_index[i]`` (default: ``i``, so ``len(texts) == B``).  With ``itc_prescreen``,
        texts whose ITC is below it get ``itm = nan`` and skip the ITM pass.  With
        ``return_feats`` also the ITC features ``image (B, E)`` and ``text (N, E)`` (numpy)."""
        n = len(texts)
        idx = torch.arange(n) if image_index is None else torch.as_tensor(list(image_index), dtype=torch.long)
        if image_index is None and n != image_embeds.shape[0]:
            raise ValueError(f"{n} texts for {image_embeds.shape[0]} images: pass image_index")
        itc = np.full(n, np.nan, np.float32)
        itm = np.full(n, np.nan, np.float32)
        if n == 0:
            return (itc, itm, None, None) if return_feats else (itc, itm)
        idx = idx.to(image_embeds.device)
        b = self.backend
        size = min(self.batch_size, LENGTH_BUCKET)
        with autocast(b.device, self.precision):
            img_f = unit(b.image_feat(image_embeds))  # (B, E)
            cross = b.fast_encoder.cross_kv(image_embeds)  # each image's cross-attention K/V, once
            txt_f: Optional[torch.Tensor] = None
            pending = []  # ITM chunks left for after the ITC pre-screen
            for rows in length_chunks(np.arange(n), texts, size):  # one tokenization serves ITC and ITM
                ids, itm_ids, mask = b.tokenize_pair([texts[i] for i in rows])
                f = unit(b.text_feat_ids(ids, mask))
                if txt_f is None:
                    txt_f = torch.zeros(n, f.shape[1], device=f.device)
                r = torch.as_tensor(rows, device=idx.device)
                txt_f[r] = f
                itc[rows] = (img_f[idx[r]] * f).sum(-1).cpu().numpy()
                if itc_prescreen is None:
                    itm[rows] = b.itm_probs_ids(itm_ids, mask, idx[r], cross).float().cpu().numpy()
                else:
                    pending.append((rows, itm_ids, mask))
            for rows, itm_ids, mask in pending:
                keep = itc[rows] >= itc_prescreen
                if keep.any():
                    r = torch.as_tensor(rows[keep], device=idx.device)
                    k = torch.as_tensor(np.flatnonzero(keep), device=itm_ids.device)
                    itm[rows[keep]] = b.itm_probs_ids(itm_ids[k], mask[k], idx[r], cross).float().cpu().numpy()
        if return_feats:
            return itc, itm, img_f.cpu().numpy(), txt_f.cpu().numpy()
        return itc, itm


__all__ = ["ItmFilter"]
