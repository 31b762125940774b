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
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

import numpy as np

from vlp_core.errors import VlpError
from vlp_core.io import read_json_object
from vlp_core.precision import autocast_for

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# OpenAI CLIP's pixel statistics: BlipImageProcessor's defaults (transformers' OPENAI_CLIP_MEAN/STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# where an HF folder keeps its image processor's settings: transformers < 5 (and our exports) write
# preprocessor_config.json; transformers 5's processor save_pretrained only processor_config.json
# (nested under "image_processor")
PREPROCESSOR_FILE, PROCESSOR_FILE = "preprocessor_config.json", "processor_config.json"
HF_PREPROCESSOR_FILE = PREPROCESSOR_FILE
PIL_BICUBIC = 3  # the resample the pipeline uses (decode and ImageSpec both resize bicubic)


class ImageSettingsError(VlpError, ValueError):
    """An HF folder's image processor settings that cannot be read (bad JSON, a mean that is not
    three numbers)."""


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


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ImageSettingsError)


def read_image_settings(hf_dir: str | Path) -> dict[str, tuple[Any, Path]]:
    """The image processor's settings of an HF folder, ``{key: (value, file it came from)}``:
    each key from ``preprocessor_config.json`` or, where that file lacks it, from
    ``processor_config.json``'s ``image_processor`` (transformers 5 writes only the latter)."""
    d = Path(hf_dir)
    found: dict[str, tuple[Any, Path]] = {}
    for name in (PREPROCESSOR_FILE, PROCESSOR_FILE):
        path = d / name
        if not path.is_file():
            continue
        raw = _read_json(path)
        if name == PROCESSOR_FILE:
            raw = raw.get("image_processor") or {}
            if not isinstance(raw, dict):
                raise ImageSettingsError(f"{path}: image_processor is not a JSON object")
        for k, v in raw.items():
            if v is not None:
                found.setdefault(k, (v, path))
    return found


def _triple(key: str, value: Any, path: Path) -> tuple[float, float, float]:
    vals = [value] * 3 if isinstance(value, (int, float)) else value
    try:
        out = tuple(float(x) for x in vals)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3:
        raise ImageSettingsError(f"{path}: {key} is {value!r}; expected three numbers (R, G, B)")
    return out


def hf_image_spec(hf_dir: str | Path, vision_size: int) -> ImageSpec:
    """``(size, mean, std)`` an HF BLIP folder's images are prepared with (see
    :func:`read_image_settings`).  The size is the ViT's ``vision_size`` (its position
    embeddings are fixed; a processor size that differs is named in a warning).  Without a mean
    and std in either file, CLIP's are used and one warning line says so.  The pipeline resizes
    bicubic to the model's size; a processor that says otherwise (``do_resize: false``, another
    ``resample``) is named in a warning."""
    d = Path(hf_dir)
    st = read_image_settings(d)
    if "image_mean" in st and "image_std" in st:
        mean, std = _triple("image_mean", *st["image_mean"]), _triple("image_std", *st["image_std"])
    else:
        lacking = " and ".join(k for k in ("image_mean", "image_std") if k not in st)
        if "image_mean" in st or "image_std" in st:  # half given: the other half alone is no basis
            have = "image_mean" if "image_mean" in st else "image_std"
            log.warning("%s: %s has %s but no %s; using CLIP's mean and std (BlipImageProcessor's defaults)",
                        d, st[have][1].name, have, lacking)
        else:
            log.warning("%s: no image_mean/image_std in %s or %s; using CLIP's mean and std "
                        "(BlipImageProcessor's defaults)", d, PREPROCESSOR_FILE, PROCESSOR_FILE)
        mean, std = CLIP_MEAN, CLIP_STD
    if "size" in st:
        s, path = st["size"]
        pp_size = s.get("height", s.get("shortest_edge")) if isinstance(s, dict) else s
        if pp_size is not None and int(pp_size) != vision_size:
            log.warning("%s: size %s differs from the vision model's %s; using %s", path, pp_size, vision_size,
                        vision_size)
    if "do_resize" in st and not st["do_resize"][0]:
        log.warning("%s: do_resize is false; the pipeline resizes every image to %s px", st["do_resize"][1],
                    vision_size)
    if "resample" in st and st["resample"][0] != PIL_BICUBIC:
        log.warning("%s: resample is %s; the pipeline resizes bicubic (%s)", st["resample"][1], st["resample"][0],
                    PIL_BICUBIC)
    return ImageSpec(int(vision_size), mean, std)


def autocast(device: "torch.device", precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast where ``precision`` (``capfilt.precision``: auto | fp32 | bf16) says so
    (``auto``: on CUDA and on CPUs with native bf16, :mod:`vlp_core.precision`), else nothing."""
    return autocast_for(precision, device)


class ImageEncoder(Protocol):
    """What :func:`embed_images` needs (a CapFilt backend has it)."""

    device: "torch.device"

    def preprocess(self, images: Any) -> "torch.Tensor": ...

    def encode_image(self, pixel_values: "torch.Tensor") -> "torch.Tensor": ...


def embed_images(encoder: ImageEncoder, images: Any, precision: str) -> "torch.Tensor":
    """uint8 ``(B, H, W, 3)`` -> image token embeddings ``(B, 1 + N, Dv)`` of ``encoder``
    (no gradients; bf16 autocast where ``precision`` says so, see :func:`autocast`)."""
    import torch

    with torch.no_grad(), autocast(encoder.device, precision):
        return encoder.encode_image(encoder.preprocess(images))


__all__ = ["CLIP_MEAN", "CLIP_STD", "ImageEncoder", "ImageSpec", "autocast", "decode_image", "embed_images",
           "hf_image_spec", "read_image_settings", "ImageSettingsError", "PREPROCESSOR_FILE", "PROCESSOR_FILE"]
