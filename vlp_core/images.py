"""Images, once: bytes -> pixels, pixels -> a model's input, a model's input -> image embeddings.

* :func:`decode_image`: image bytes -> ``(size, size, 3)`` uint8 RGB (PIL, bicubic resize
  when the size differs).  Every reader of images uses it: ``vlp_core.shards`` (training,
  evaluation, calibration), CapFilt and the features stage.
* :class:`ImageSpec` (``size``, ``mean``, ``std``) and its :meth:`~ImageSpec.preprocess`:
  uint8 ``(B, H, W, 3)`` -> normalised float ``(B, 3, size, size)`` (bicubic interpolation of
  the [0, 1] tensor when the size differs, then ``(x - mean) / std``).  The native MED
  (``BlipMED.preprocess``), both CapFilt backends and the features stage's timm backbone
  preprocess with it.  :func:`hf_image_spec` reads a Hugging Face folder's
  ``preprocessor_config.json`` into one.
* :func:`embed_images`: uint8 pixels -> image token embeddings ``(B, 1 + N, Dv)`` of any
  encoder with ``device``, ``preprocess`` and ``encode_image`` (a CapFilt backend), under
  bf16 autocast on CUDA (:func:`autocast`) and fp32 on a CPU.

This module sits below the models, CapFilt and features (it imports none of them); torch
loads on first use, so ``vlp_core.shards`` stays light to import.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics: BlipImageProcessor's defaults (transformers' OPENAI_CLIP_MEAN/STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HF_PREPROCESSOR_FILE = "preprocessor_config.json"


def decode_image(data: bytes, size: Optional[int] = None) -> np.ndarray:
    """Image bytes -> ``(size, size, 3)`` uint8 RGB (bicubic resize when needed; ``size=None``
    keeps the image's own size).  Raises on corrupt data (PIL raises many types); the caller
    turns that into a row reason."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    img = img.convert("RGB")
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


@dataclass(frozen=True)
class ImageSpec:
    """What a vision encoder expects: square ``size`` pixels normalised by ``mean`` / ``std``."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def preprocess(self, images: Any, device: Optional["torch.device | str"] = None) -> "torch.Tensor":
        """uint8 ``(B, H, W, 3)`` or ``(H, W, 3)`` (numpy or tensor) -> normalised float
        ``(B, 3, size, size)`` on ``device`` (default: where ``images`` are)."""
        import torch
        import torch.nn.functional as F

        x = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if device is not None:
            x = x.to(device)
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std


def hf_image_spec(model_dir: str | Path, size: int) -> ImageSpec:
    """A Hugging Face BLIP folder's :class:`ImageSpec`: mean and std from its
    ``preprocessor_config.json`` (``BlipImageProcessor``'s CLIP defaults where absent); the size
    is the vision model's ``size`` (its position embeddings are fixed), with a warning when
    the preprocessor names another."""
    mean, std = CLIP_MEAN, CLIP_STD
    pp = Path(model_dir) / HF_PREPROCESSOR_FILE
    if pp.is_file():
        raw = json.loads(pp.read_text())
        mean = tuple(float(x) for x in raw.get("image_mean") or mean)
        std = tuple(float(x) for x in raw.get("image_std") or std)
        s = raw.get("size")
        pp_size = s.get("height", s.get("shortest_edge")) if isinstance(s, dict) else s
        if pp_size is not None and int(pp_size) != int(size):
            log.warning("%s: preprocessor size %s differs from the vision model's %s; using %s",
                        pp, pp_size, size, size)
    return ImageSpec(int(size), mean, std)


def autocast(device: "torch.device") -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU (fp32 there is both faster and exact)."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class ImageEncoder(Protocol):
    """What :func:`embed_images` needs (a CapFilt backend has it)."""

    device: "torch.device"

    def preprocess(self, images: Any) -> "torch.Tensor": ...

    def encode_image(self, pixel_values: "torch.Tensor") -> "torch.Tensor": ...


def embed_images(encoder: ImageEncoder, images: Any) -> "torch.Tensor":
    """uint8 ``(B, H, W, 3)`` -> image token embeddings ``(B, 1 + N, Dv)`` of ``encoder``
    (no gradients; bf16 autocast on CUDA)."""
    import torch

    with torch.no_grad(), autocast(encoder.device):
        return encoder.encode_image(encoder.preprocess(images))


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageEncoder", "ImageSpec", "autocast", "decode_image", "embed_images",
           "hf_image_spec"]
