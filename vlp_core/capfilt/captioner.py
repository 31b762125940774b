"""The captioner: ``K`` synthetic captions per image (BLIP's CapFilt "Cap").

Decoding follows BLIP: nucleus sampling (``top_p`` 0.9, no top-k) after the prompt
``"a picture of "``, with a minimum and maximum length counted after the prompt; beam search
and greedy decoding are options.  Generation is batched and KV-cached (``transformers``'
``generate`` on the image-grounded decoder for beam search; for sampling and greedy decoding
:class:`~vlp_core.capfilt.fastmed.FastText`'s SDPA decoding loop, which computes the image's
cross-attention keys/values once and drops finished rows from the batch).
Captions come back without the prompt, as
BLIP's CapFilt stores them.  Two backends sit behind the same interface: vlp_core
checkpoints and local Hugging Face ``BlipForConditionalGeneration`` folders
(:mod:`vlp_core.capfilt.backend`).  Encoding and decoding run under bf16 autocast where
``capfilt.precision`` says so (:mod:`vlp_core.precision`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vlp_core.capfilt.backend import Backend, BackendRole, CapfiltError
from vlp_core.config import CapfiltParams
from vlp_core.images import autocast


class Captioner(BackendRole):
    """``Captioner(model_dir, params.capfilt).caption(images, k) -> list[list[str]]``."""

    role = "captioner"

    def __init__(self, model_dir: str | Path, params: CapfiltParams = CapfiltParams(),
                 device: Optional[str] = None, backend: Optional[Backend] = None):
        super().__init__(model_dir, device, backend, params.precision)
        self.params = params
        if params.decode == "beam" and params.num_captions > params.num_beams:
            raise CapfiltError(f"capfilt.num_captions ({params.num_captions}) must not exceed capfilt.num_beams "
                               f"({params.num_beams}) with decode=beam")

    @torch.no_grad()
    def caption(self, images: np.ndarray | torch.Tensor, k: Optional[int] = None,
                generator: Optional[torch.Generator] = None) -> list[list[str]]:
        """``k`` captions (default ``num_captions``) for each image of a batch.

        ``images``: uint8 pixels ``(B, H, W, 3)`` (numpy or tensor), or image embeddings
        ``(B, 1 + N, Dv)`` from this captioner's vision encoder (the one image pass).
        ``generator``: the random stream for sampling (default: torch's global one)."""
        k = self.params.num_captions if k is None else k
        if k <= 0:
            return [[] for _ in range(len(images))]
        embeds = images if torch.is_tensor(images) and images.is_floating_point() else self.encode(images)
        p = self.params
        if p.decode == "greedy" and k > 1:
            raise CapfiltError("capfilt.decode=greedy gives one caption per image; set capfilt.num_captions=1 "
                               "or decode to nucleus or beam")
        with autocast(self.backend.device, p.precision):
            if p.decode == "beam":
                flat = self.backend.generate(embeds, sample=False, top_p=p.top_p, num_beams=max(p.num_beams, k),
                                             max_length=p.max_length, min_length=p.min_length, prompt=p.prompt,
                                             num_return_sequences=k)
            else:
                rep = embeds.repeat_interleave(k, dim=0) if k > 1 else embeds  # (B*k, 1+N, Dv), image-major
                _, ids, eos, _ = self.backend.decoder_inputs(p.prompt, rep.shape[0])
                toks = self.backend.fast_decoder.decode(ids, rep, sample=p.decode == "nucleus", top_p=p.top_p,
                                                        max_new=p.max_length, min_new=p.min_length, eos_id=eos,
                                                        generator=generator)
                flat = [c.strip() for c in self.backend.tokenizer.batch_decode(toks, skip_special_tokens=True)]
        return [flat[i * k:(i + 1) * k] for i in range(embeds.shape[0])]


__all__ = ["Captioner"]
