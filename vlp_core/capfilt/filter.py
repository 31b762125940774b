"""The filter: ITC similarity and ITM match probability for (image, text) candidates
(BLIP's CapFilt "Filt").

Backends: vlp_core checkpoints and local Hugging Face ``BlipForImageTextRetrieval`` folders
(:mod:`vlp_core.capfilt.backend`).  Scores are computed from image embeddings, so the image
is encoded once however many candidate texts it has; the optional ITC pre-screen skips the
(costlier, cross-attending) ITM pass for candidates whose ITC is far too low.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from vlp_core.capfilt.backend import Backend, autocast, iter_batches, load_backend


class ItmFilter:
    """``ItmFilter(model_dir).scores(image_embeds, texts) -> (itc, itm)``."""

    def __init__(self, model_dir: str | Path, device: Optional[str] = None, backend: Optional[Backend] = None,
                 batch_size: int = 256):
        self.backend = backend or load_backend(model_dir, "filter", device)
        self.batch_size = batch_size

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def vision_key(self) -> str:
        return self.backend.vision_key

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> ``image_embeds (B, 1 + N, Dv)``."""
        b = self.backend
        with autocast(b.device):
            return b.encode_image(b.preprocess(images))

    @torch.no_grad()
    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image features ``(B, E)`` (float32)."""
        with autocast(self.backend.device):
            return self.backend.image_feat(image_embeds).float()

    @torch.no_grad()
    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised ITC text features ``(N, E)`` (float32), in batches."""
        outs = []
        with autocast(self.backend.device):
            for sl in iter_batches(len(texts), self.batch_size):
                outs.append(self.backend.text_feat(list(texts[sl])).float())
        if not outs:
            return torch.zeros(0, 0)
        return torch.cat(outs)

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
        img_f = self.image_feat(image_embeds)  # (B, E)
        txt_f = self.text_feat(texts).to(img_f.device)  # (N, E)
        itc[:] = (img_f[idx] * txt_f).sum(-1).cpu().numpy()
        todo = np.arange(n) if itc_prescreen is None else np.flatnonzero(itc >= itc_prescreen)
        with autocast(self.backend.device):
            for sl in iter_batches(len(todo), self.batch_size):
                rows = torch.as_tensor(todo[sl], device=idx.device)
                imgs, inv = torch.unique(idx[rows], return_inverse=True)  # each image's cross K/V once
                probs = self.backend.itm_probs(image_embeds[imgs], [texts[i] for i in todo[sl]], inv)
                itm[todo[sl]] = probs.float().cpu().numpy()
        if return_feats:
            return itc, itm, img_f.cpu().numpy(), txt_f.cpu().numpy()
        return itc, itm


__all__ = ["ItmFilter"]
