"""Vision encoders: any timm model by name, returning a token sequence with a pooled token first.

Two families are used:

* a timm **ViT** (``vit_*``), as in BLIP: ``forward_features`` already returns
  ``(B, 1 + N, D)`` with the CLS token first.  Only this family exports to Hugging Face
  BLIP (see :mod:`vlp_core.models.hf`).
* ``vlp_cnn_tiny`` (registered here as a timm model, so ``timm.create_model`` builds it): a
  5-layer CNN giving a 6x6 grid at 48 px, plus a pooled token, plus a **fixed 2D sine-cosine
  position term** on the grid tokens, then one transformer layer.  A measured trial on this
  machine found that a patch ViT at 32-48 px learns shape and relations far too slowly on 2
  cores, and that without a strong 2D position signal left/right/above/below stay at chance.

Any other timm model works through :class:`TimmTokens`: its ``forward_features`` output is
turned into tokens (a 4D feature map is flattened; a pooled token is prepended).
"""
from __future__ import annotations

import math
from typing import Any

import timm
import torch
import torch.nn as nn
from timm.models import register_model


def sincos_2d(h: int, w: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding, ``(h * w, dim)``; half the channels encode y,
    half x (MAE's recipe)."""
    assert dim % 4 == 0, "dim must be divisible by 4"
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))

    def enc(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega.reshape(1, -1)  # (h*w, dim/4)
        return torch.cat([out.sin(), out.cos()], dim=1)  # (h*w, dim/2)

    return torch.cat([enc(ys), enc(xs)], dim=1)  # (h*w, dim)


def _conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.GELU())


class TinyCnnEncoder(nn.Module):
    """48 px -> 6x6 grid of ``width``-d tokens (+1 pooled token), sin-cos positions, 1 transformer layer.

    Shapes: ``(B, 3, 48, 48) -> (B, 1 + 36, width)``.
    """

    def __init__(self, img_size: int = 48, widths: tuple[int, int, int] = (32, 64, 128), depth: int = 1,
                 num_heads: int = 2, mlp_ratio: float = 4.0, pos_scale: float = 4.0, **_: Any):
        super().__init__()
        w1, w2, w3 = widths
        self.stem = nn.Sequential(
            _conv(3, w1, 2),  # 48 -> 24
            _conv(w1, w1, 1),
            _conv(w1, w2, 2),  # 24 -> 12
            _conv(w2, w2, 1),
            _conv(w2, w3, 2),  # 12 -> 6
        )
        self.grid = math.ceil(img_size / 8)
        self.num_features = self.embed_dim = w3
        self.pos_scale = pos_scale
        self.register_buffer("pos", sincos_2d(self.grid, self.grid, w3), persistent=False)
        self.pool_token = nn.Parameter(torch.zeros(1, 1, w3))
        layer = nn.TransformerEncoderLayer(w3, num_heads, int(w3 * mlp_ratio), dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(w3)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(x)  # (B, C, g, g)
        b, c, h, w = f.shape
        tokens = f.flatten(2).transpose(1, 2)  # (B, g*g, C)
        pos = self.pos if (h, w) == (self.grid, self.grid) else sincos_2d(h, w, c).to(x.device)
        tokens = tokens + self.pos_scale * pos.unsqueeze(0)
        pooled = tokens.mean(dim=1, keepdim=True) + self.pool_token  # (B, 1, C)
        seq = torch.cat([pooled, tokens], dim=1)  # (B, 1 + g*g, C)
        return self.norm(self.blocks(seq))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[:, 0]


@register_model
def vlp_cnn_tiny(pretrained: bool = False, **kwargs: Any) -> TinyCnnEncoder:
    """timm entry point for :class:`TinyCnnEncoder` (no pretrained weights exist)."""
    for k in ("num_classes", "global_pool", "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(k, None)
    return TinyCnnEncoder(**kwargs)


class TimmTokens(nn.Module):
    """Wraps any timm model so that it returns ``(B, 1 + N, D)`` tokens with a pooled token first."""

    def __init__(self, name: str, img_size: int, **kwargs: Any):
        super().__init__()
        self.name = name
        extra = dict(kwargs)
        if name.startswith(("vit_", "deit_")):
            extra.setdefault("img_size", img_size)
        self.model = timm.create_model(name, pretrained=False, num_classes=0, **extra)
        self.num_features = int(getattr(self.model, "num_features", getattr(self.model, "embed_dim", 0)))
        self.is_vit = hasattr(self.model, "cls_token") and hasattr(self.model, "blocks")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(pixel_values)
        if f.dim() == 4:  # CNN feature map (B, C, H, W) -> (B, 1 + H*W, C)
            tokens = f.flatten(2).transpose(1, 2)
            f = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        return f


def create_vision(name: str, img_size: int, **kwargs: Any) -> TimmTokens:
    return TimmTokens(name, img_size, **kwargs)
