"""ViLBERT (Lu et al. 2019): two streams joined by co-attentional transformer layers, at tiny sizes.

Structure (``forward`` and the scoring methods share it):

* **visual stream input: grid features** (the VLP survey's CNN-GFs).  ViLBERT reads 10-36
  detector regions; no detector exists offline here, so the regions are the cells of the
  vision backbone's grid (``vlp_core/models/vision.py``: ``vlp_cnn_tiny`` gives a 6x6 grid plus
  a pooled token at 48 px; a timm ViT's patch tokens work the same way).  The backbone's
  pooled token is ViLBERT's ``[IMG]`` token (the mean-pooled image feature).  Each region gets
  ViLBERT's 5-d location embedding (x1, y1, x2, y2, area; the whole image for ``[IMG]``),
  projected and added to the projected feature;
* **text stream**: BERT embeddings, then ``num_text_pre_layers`` TRM layers on the text alone
  (ViLBERT gives language more processing before the streams meet);
* ``num_co_layers`` blocks of **Co-TRM then TRM**: in a Co-TRM each stream's queries attend to
  the *other* stream's keys and values (:class:`CoAttention`), each stream keeps its own
  residual, layer norm and feed-forward; a TRM is an ordinary per-stream self-attention layer;
* pooled outputs: ``[CLS]`` (text) and ``[IMG]`` (vision), each dense + tanh into
  ``bi_hidden_size``; their element-wise product -> a linear layer is the **alignment head**.

Pretraining objectives (``forward``):

* **masked language modelling**: 15 % of the word tokens (BERT's 80 / 10 / 10 replacement);
* **masked region modelling**: ~15 % of the grid cells; a masked cell's feature is zeroed
  90 % of the time (kept 10 %), as ViLBERT does, and the model predicts a *distribution over
  region classes*, trained with KL divergence.  ViLBERT's target is its detector's class
  distribution; here no detector and no ground truth exist, so the classes are a **k-means
  codebook over the training images' pixel cells**, fitted once before training
  (:meth:`ViLBERT.fit_region_codebook`, called by the training loop through
  :meth:`ViLBERT.prepare_training`) and saved with the weights.  The soft target of a cell is
  ``softmax(-|d - c_k|^2 / tau)`` over the centroids ``c_k`` of its pixel descriptor ``d``
  (the cell's pixels average-pooled to 2x2x3).  Why pixels and not backbone features: the
  backbone trains end to end from random weights, so a codebook over its features would be
  fitted on noise and drift away from them; a codebook over the pixels is fixed, like a frozen
  detector, cannot collapse (a momentum teacher's softmax can, without DINO's centring), and
  in the synthetic world its clusters are "which colour / which part of a shape is here";
* **multimodal alignment prediction**: aligned pairs against each image paired with another
  batch text (never one of the same image or the same caption), plus, when the loop gives
  them, the pair's compositional hard-negative text (``vlp_core.train.hardneg``).  As in
  ViLBERT, the alignment pass reads the *masked* inputs (all rows are masked alike, so
  masking is no cue), and MLM / MRM count on the aligned rows only;
* **a small dual-encoder head** (not ViLBERT's; documented deviation): the ``[IMG]`` token and
  the text stream's ``[CLS]`` before co-attention, projected and trained with an in-batch
  contrastive loss.  ViLBERT has no ITC and ranks retrieval candidates by its alignment score
  over every pair; scoring all pairs of a 1,000 x 1,000 test set through the co-attention
  layers is a million passes, far too slow on 2 cores, so this head gives the ITC stage the
  platform's evaluation (top-k, then re-rank by the alignment head), CapFilt's ``itc`` column
  and the features stage expect.  Its weight is the section's ``itc_weight`` (0 switches it off);
  its negatives are the batch's own (per rank under DDP; no queue, no momentum encoder).

The loop's loss weights map onto these objectives (:func:`objective_weights`): ``itm_weight``
-> alignment prediction, ``lm_weight`` -> masked multimodal modelling (MLM, plus MRM at the
architecture's ``mrm_weight`` relative to it), ``itc_weight`` -> the dual-encoder head.

ViLBERT does not generate: :meth:`ViLBERT.generate` raises :class:`ModelError`, so it can be
the filter but never the captioner.

Persistence: ``save_pretrained`` / ``from_pretrained`` write ``config.json`` (``model_type:
vlp-vilbert``, ``family: vilbert``), ``model.safetensors`` and ``tokenizer/``, as
:class:`~vlp_core.models.med.BlipMED` does.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_core.images import ImageSpec
from vlp_core.models import load_architecture
from vlp_core.models.med import CONFIG_FILE, TOKENIZER_DIR, WEIGHTS_FILE, ModelError
from vlp_core.models.tokenizer import load_tokenizer
from vlp_core.models.vision import create_vision

MODEL_TYPE = "vlp-vilbert"
FAMILY = "vilbert"
LOSS_NAMES = ("itc", "mlm", "mrm", "align")
CODEBOOK_IMAGES = 2048  # training images the region codebook is fitted on (evenly spaced)
CODEBOOK_ITERS = 25


@dataclass
class VilbertConfig:
    """Everything needed to rebuild the model (saved as ``config.json``).  Sizes: the text
    stream is ``hidden_size`` wide, the visual stream ``v_hidden_size``; co-attention runs at
    ``bi_hidden_size``.  ``mlm_prob`` / ``mrm_prob``: the share of words / grid cells masked;
    ``region_classes``: the codebook size (the MRM classes); ``mrm_weight``: MRM relative to MLM."""

    arch: str = "vilbert-tiny"
    family: str = FAMILY
    vision: str = "vlp_cnn_tiny"
    vision_kwargs: dict = field(default_factory=dict)
    image_size: int = 48
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    vocab_size: int = 512
    hidden_size: int = 128
    v_hidden_size: int = 128
    bi_hidden_size: int = 128
    num_attention_heads: int = 2
    v_num_attention_heads: int = 2
    bi_num_attention_heads: int = 2
    intermediate_size: int = 512
    v_intermediate_size: int = 512
    num_text_pre_layers: int = 1
    num_co_layers: int = 2
    max_position_embeddings: int = 64
    max_text_len: int = 32
    embed_dim: int = 128  # the dual-encoder head's projection size
    temp: float = 0.07
    mlm_prob: float = 0.15
    mrm_prob: float = 0.15
    mrm_weight: float = 1.0
    region_classes: int = 32
    codebook_seed: int = 0
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    mask_token_id: int = 4

    def __post_init__(self) -> None:
        if self.family != FAMILY:
            raise ModelError(f"family is {self.family!r}; a ViLBERT config has family {FAMILY!r}")
        for name in ("mlm_prob", "mrm_prob"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise ModelError(f"{name} is {v}; expected a share between 0 and 1 (exclusive)")
        if self.region_classes < 2:
            raise ModelError(f"region_classes is {self.region_classes}; expected at least 2")
        if self.num_co_layers < 1:
            raise ModelError(f"num_co_layers is {self.num_co_layers}; ViLBERT needs at least one co-attention layer")
        for width, heads, what in ((self.hidden_size, self.num_attention_heads, "hidden_size"),
                                   (self.v_hidden_size, self.v_num_attention_heads, "v_hidden_size"),
                                   (self.bi_hidden_size, self.bi_num_attention_heads, "bi_hidden_size")):
            if width % heads:
                raise ModelError(f"{what} {width} is not divisible by its number of attention heads {heads}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VilbertConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("image_mean", "image_std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)


def objective_weights(weights: Optional[dict[str, float]], mrm_weight: float) -> dict[str, float]:
    """The loop's ``{itc, itm, lm}`` weights as ViLBERT's objectives (see the module
    docstring); keys ``mlm``, ``mrm``, ``align`` given directly win."""
    w = {"itc": 1.0, "itm": 1.0, "lm": 1.0, **(weights or {})}
    out = {"itc": w["itc"], "align": w["itm"], "mlm": w["lm"], "mrm": w["lm"] * mrm_weight}
    out.update({k: w[k] for k in ("mlm", "mrm", "align") if k in w})
    return out


# --------------------------------------------------------------------------- layers
class Attention(nn.Module):
    """Multi-head attention, queries from ``x`` (width ``q_dim``), keys and values from
    ``ctx`` (width ``kv_dim``), at ``inner`` width; output projected back to ``q_dim``, then
    residual + LayerNorm (BERT's post-LN).  With ``ctx = x`` it is self-attention; with the
    other stream it is one half of a Co-TRM."""

    def __init__(self, q_dim: int, kv_dim: int, inner: int, heads: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, inner // heads
        self.query = nn.Linear(q_dim, inner)
        self.key = nn.Linear(kv_dim, inner)
        self.value = nn.Linear(kv_dim, inner)
        self.out = nn.Linear(inner, q_dim)
        self.norm = nn.LayerNorm(q_dim, eps=eps)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # (B, L, H*d) -> (B, H, L, d)
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """``ctx_mask (B, L_ctx)``: 1 for tokens that may be attended to."""
        q, k, v = self._split(self.query(x)), self._split(self.key(ctx)), self._split(self.value(ctx))
        h = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None, :].bool())
        h = h.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.norm(x + self.out(h))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int, eps: float):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, inner), nn.Linear(inner, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


class TRM(nn.Module):
    """One per-stream transformer layer: self-attention then feed-forward."""

    def __init__(self, dim: int, inner: int, heads: int, eps: float):
        super().__init__()
        self.attn = Attention(dim, dim, dim, heads, eps)
        self.ffn = FeedForward(dim, inner, eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.attn(x, x, mask))


class CoAttention(nn.Module):
    """ViLBERT's Co-TRM: the text stream's queries attend to the visual stream's keys and
    values and the visual stream's queries to the text's (the (K, V) of the two streams
    exchanged); each stream then has its own residual, LayerNorm and feed-forward."""

    def __init__(self, cfg: VilbertConfig):
        super().__init__()
        eps = cfg.layer_norm_eps
        self.t_from_v = Attention(cfg.hidden_size, cfg.v_hidden_size, cfg.bi_hidden_size, cfg.bi_num_attention_heads, eps)
        self.v_from_t = Attention(cfg.v_hidden_size, cfg.hidden_size, cfg.bi_hidden_size, cfg.bi_num_attention_heads, eps)
        self.t_ffn = FeedForward(cfg.hidden_size, cfg.intermediate_size, eps)
        self.v_ffn = FeedForward(cfg.v_hidden_size, cfg.v_intermediate_size, eps)

    def forward(self, t: torch.Tensor, t_mask: torch.Tensor, v: torch.Tensor,
                v_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t2 = self.t_from_v(t, v, v_mask)  # both read the streams as they came in
        v2 = self.v_from_t(v, t, t_mask)
        return self.t_ffn(t2), self.v_ffn(v2)


def grid_locations(n_regions: int, device: torch.device) -> torch.Tensor:
    """ViLBERT's 5-d location of ``[IMG]`` (the whole image) and each cell of a square grid
    of ``n_regions`` cells, row-major: ``(1 + n, 5)`` of (x1, y1, x2, y2, area), in [0, 1]."""
    g = int(round(math.sqrt(n_regions)))
    if g * g != n_regions:
        raise ModelError(f"the vision backbone gives {n_regions} region tokens; ViLBERT's grid regions need a "
                         "square grid (a CNN feature map or a ViT's patch tokens)")
    i, j = torch.meshgrid(torch.arange(g, dtype=torch.float32), torch.arange(g, dtype=torch.float32), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    cells = torch.stack([j / g, i / g, (j + 1) / g, (i + 1) / g, torch.full_like(i, 1.0 / (g * g))], dim=1)
    whole = torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])
    return torch.cat([whole, cells], 0).to(device)


def region_descriptors(pixel_values: torch.Tensor, n_regions: int) -> torch.Tensor:
    """Each grid cell's pixels average-pooled to 2x2x3: ``(B, 3, S, S) -> (B, n, 12)``, in
    the backbone's row-major cell order (the region-class codebook's input)."""
    g = int(round(math.sqrt(n_regions)))
    p = F.adaptive_avg_pool2d(pixel_values.float(), (2 * g, 2 * g))  # (B, 3, 2g, 2g)
    b = p.shape[0]
    p = p.view(b, 3, g, 2, g, 2).permute(0, 2, 4, 1, 3, 5)  # (B, g, g, 3, 2, 2)
    return p.reshape(b, g * g, 12)


def kmeans(x: torch.Tensor, k: int, iters: int, seed: int) -> torch.Tensor:
    """Plain k-means (k-means++ seeding, seeded) of ``x (N, D)`` -> centroids ``(k, D)``."""
    gen = torch.Generator().manual_seed(seed)
    x = x.float()
    n = x.shape[0]
    if n < k:
        raise ModelError(f"the region codebook needs at least {k} grid cells to fit {k} classes; got {n}")
    cent = [x[torch.randint(n, (1,), generator=gen)].squeeze(0)]
    d2 = ((x - cent[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1.0 / n)
        c = x[torch.multinomial(probs, 1, generator=gen)].squeeze(0)
        cent.append(c)
        d2 = torch.minimum(d2, ((x - c) ** 2).sum(1))
    c = torch.stack(cent)
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float().unsqueeze(1)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # an empty cluster keeps its centroid
    return c


def _bert_init(module: nn.Module) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------- the model
class ViLBERT(nn.Module):
    """The two-stream model.  Same public interface as :class:`~vlp_core.models.med.BlipMED`
    for training, evaluation and the filter (``preprocess``, ``tokenize``, ``encode_image``,
    ``image_feat``, ``text_feat``, ``itm_logits``, ``itm_probs``, ``forward`` -> loss dict,
    ``save_pretrained`` / ``from_pretrained``); ``generate`` refuses."""

    LOSS_NAMES = LOSS_NAMES
    generates = False

    def __init__(self, config: VilbertConfig, tokenizer=None):
        super().__init__()
        self.config = cfg = config
        self.tokenizer = tokenizer
        eps = cfg.layer_norm_eps
        self.visual_encoder = create_vision(cfg.vision, cfg.image_size, **cfg.vision_kwargs)
        vw = self.visual_encoder.num_features
        # text embeddings (BERT: word + position, LayerNorm)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.text_norm = nn.LayerNorm(cfg.hidden_size, eps=eps)
        # image embeddings (ViLBERT's BertImageEmbeddings: feature + 5-d location, LayerNorm)
        self.image_embeddings = nn.Linear(vw, cfg.v_hidden_size)
        self.image_location = nn.Linear(5, cfg.v_hidden_size)
        self.image_norm = nn.LayerNorm(cfg.v_hidden_size, eps=eps)
        self.text_pre = nn.ModuleList([TRM(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, eps)
                                       for _ in range(cfg.num_text_pre_layers)])
        self.co_layers = nn.ModuleList([CoAttention(cfg) for _ in range(cfg.num_co_layers)])
        self.text_layers = nn.ModuleList([TRM(cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, eps)
                                          for _ in range(cfg.num_co_layers)])
        self.image_layers = nn.ModuleList([TRM(cfg.v_hidden_size, cfg.v_intermediate_size, cfg.v_num_attention_heads,
                                               eps) for _ in range(cfg.num_co_layers)])
        # pooled outputs and the alignment head
        self.text_pool = nn.Linear(cfg.hidden_size, cfg.bi_hidden_size)
        self.image_pool = nn.Linear(cfg.v_hidden_size, cfg.bi_hidden_size)
        self.align_head = nn.Linear(cfg.bi_hidden_size, 2)
        # MLM head (BERT's transform + a decoder tied to the word embeddings)
        self.mlm_transform = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                                           nn.LayerNorm(cfg.hidden_size, eps=eps))
        self.mlm_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        # MRM head: a distribution over the codebook's region classes
        self.mrm_head = nn.Sequential(nn.Linear(cfg.v_hidden_size, cfg.v_hidden_size), nn.GELU(),
                                      nn.LayerNorm(cfg.v_hidden_size, eps=eps),
                                      nn.Linear(cfg.v_hidden_size, cfg.region_classes))
        # the dual-encoder head (retrieval's first stage; see the module docstring)
        self.vision_proj = nn.Linear(vw, cfg.embed_dim)
        self.text_proj = nn.Linear(cfg.hidden_size, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temp)))
        self.register_buffer("region_codebook", torch.zeros(cfg.region_classes, 12))
        self.register_buffer("codebook_tau", torch.zeros(()))  # 0 = not fitted yet
        for name, module in self.named_children():
            if name != "visual_encoder":  # the backbone keeps its own (timm) initialisation
                module.apply(_bert_init)

    # ------------------------------------------------------------------ basics
    @property
    def device(self) -> torch.device:
        return self.temp.device

    @property
    def image_spec(self) -> ImageSpec:
        cfg = self.config
        return ImageSpec(int(cfg.image_size), tuple(cfg.image_mean), tuple(cfg.image_std))

    def preprocess(self, images) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> normalised float ``(B, 3, S, S)`` (:class:`ImageSpec`)."""
        return self.image_spec.preprocess(images)

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def tokenize(self, texts: Sequence[str], mode: str = "enc", max_length: Optional[int] = None):
        """Token ids ``[CLS] ... [SEP]`` on the model's device.  ``mode`` ``"enc"`` and ``"itm"``
        are the same input (ViLBERT's text stream always starts with ``[CLS]``); ``"dec"``
        is refused (no decoder)."""
        if mode == "dec":
            raise ModelError("a ViLBERT model has no text decoder: it cannot caption (use a blip model as the captioner)")
        if mode not in ("enc", "itm"):
            raise ModelError(f"unknown tokenize mode {mode!r} (enc or itm)")
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer")
        texts = [t if isinstance(t, str) else "" for t in texts]
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=max_length or self.config.max_text_len, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    # ------------------------------------------------------------------ region codebook
    @property
    def codebook_fitted(self) -> bool:
        return bool(self.codebook_tau > 0)

    @torch.no_grad()
    def fit_region_codebook(self, images) -> None:
        """Fit the MRM region classes once: k-means (``region_classes`` centroids, seeded by
        ``codebook_seed``) over the pixel descriptors of every grid cell of ``images`` (uint8
        ``(N, H, W, 3)``; at most :data:`CODEBOOK_IMAGES`, evenly spaced), and the soft-target
        temperature ``tau``: the median squared distance of a cell to its nearest centroid."""
        n = len(images)
        if n == 0:
            raise ModelError("cannot fit the region codebook on zero images")
        pick = np.linspace(0, n - 1, num=min(n, CODEBOOK_IMAGES)).round().astype(np.int64)
        n_regions = self._n_regions()
        desc = []
        for s in range(0, len(pick), 256):
            px = self.image_spec.preprocess(images[pick[s:s + 256]])
            desc.append(region_descriptors(px, n_regions).reshape(-1, 12))
        x = torch.cat(desc)
        cent = kmeans(x, self.config.region_classes, CODEBOOK_ITERS, self.config.codebook_seed)
        d2 = torch.cdist(x, cent).pow(2).min(1).values
        tau = float(d2.median().clamp(min=1e-6))
        self.region_codebook.copy_(cent.to(self.region_codebook.device))
        self.codebook_tau.fill_(tau)

    def prepare_training(self, images) -> None:
        """The training loop's one-off hook before the first step of a fresh run: fit the
        region codebook from the training images unless it is already fitted (a loaded model's)."""
        if not self.codebook_fitted:
            self.fit_region_codebook(images)

    def region_targets(self, pixel_values: torch.Tensor, n_regions: int) -> torch.Tensor:
        """Soft region classes ``(B, n, K)``: softmax over centroids of ``-|d - c|^2 / tau``."""
        if not self.codebook_fitted:
            raise ModelError("the region codebook is not fitted: call fit_region_codebook(images) (or "
                             "prepare_training) on the training images before masked region modelling")
        d = region_descriptors(pixel_values, n_regions)  # (B, n, 12)
        d2 = ((d.unsqueeze(2) - self.region_codebook.float()) ** 2).sum(-1)  # (B, n, K)
        return F.softmax(-d2 / self.codebook_tau.float(), dim=-1)

    def _n_regions(self) -> int:
        with torch.no_grad():
            s = int(self.config.image_size)
            was = self.visual_encoder.training
            self.visual_encoder.eval()
            n = self.visual_encoder(torch.zeros(1, 3, s, s, device=self.device)).shape[1] - 1
            self.visual_encoder.train(was)
        return n

    # ------------------------------------------------------------------ streams
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> (B, 1 + N, Dv)``: the backbone's pooled token (``[IMG]``) and grid
        region features, before the visual stream (what CapFilt's image pass caches)."""
        return self.visual_encoder(pixel_values)

    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Text embeddings then the pre-co-attention TRM layers: ``(B, L, hidden_size)``."""
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.text_norm(self.word_embeddings(input_ids) + self.position_embeddings(pos)[None])
        for layer in self.text_pre:
            h = layer(h, attention_mask)
        return h

    def embed_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Region features + 5-d locations: ``(B, 1 + N, Dv) -> (B, 1 + N, v_hidden_size)``."""
        loc = grid_locations(image_embeds.shape[1] - 1, image_embeds.device).to(image_embeds.dtype)
        return self.image_norm(self.image_embeddings(image_embeds) + self.image_location(loc)[None])

    def co_streams(self, text: torch.Tensor, text_mask: torch.Tensor,
                   image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``num_co_layers`` blocks of Co-TRM then per-stream TRM.  ``text (B, L, Ht)``
        (after :meth:`embed_text`), ``image (B, 1 + N, Hv)`` (after :meth:`embed_image`);
        returns both streams' outputs, same shapes."""
        image_mask = torch.ones(image.shape[:2], dtype=text_mask.dtype, device=image.device)
        for co, tl, il in zip(self.co_layers, self.text_layers, self.image_layers):
            text, image = co(text, text_mask, image, image_mask)
            text, image = tl(text, text_mask), il(image, image_mask)
        return text, image

    def _align_logits(self, text_out: torch.Tensor, image_out: torch.Tensor) -> torch.Tensor:
        pooled_t = torch.tanh(self.text_pool(text_out[:, 0]))
        pooled_v = torch.tanh(self.image_pool(image_out[:, 0]))
        return self.align_head(pooled_t * pooled_v)  # (B, 2): not aligned, aligned

    # ------------------------------------------------------------------ scoring (evaluation, filter)
    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """The dual-encoder head's normalised image feature ``(B, E)`` (from ``[IMG]``)."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(self.embed_text(input_ids, attention_mask)[:, 0, :]), dim=-1)

    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        """The dual-encoder head's normalised text feature ``(B, E)`` (``[CLS]`` before co-attention)."""
        return self.text_feat_ids(*self.tokenize(texts, "enc"))

    def itm_logits_ids(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """Alignment logits ``(B, 2)`` for row-aligned images and token ids."""
        text_out, image_out = self.co_streams(self.embed_text(input_ids, attention_mask), attention_mask,
                                              self.embed_image(image_embeds))
        return self._align_logits(text_out, image_out)

    def itm_logits(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Alignment logits ``(B, 2)`` of each (image_embeds[i], texts[i]) (index 1: aligned)."""
        return self.itm_logits_ids(image_embeds, *self.tokenize(texts, "itm"))

    def itm_probs(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Probability that each (image, text) row is aligned, ``(B,)`` -- the filter's score."""
        return self.itm_logits(image_embeds, texts).float().softmax(dim=-1)[:, 1]

    def generate(self, *args: Any, **kwargs: Any) -> list[str]:
        raise ModelError("a ViLBERT model does not generate captions (no decoder): it can be the filter, "
                         "not the captioner; use a blip family model as the captioner")

    # ------------------------------------------------------------------ pretraining
    def _mask_words(self, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT masking of ``mlm_prob`` of the word tokens: ``(masked ids, labels (-100 = not masked))``."""
        cfg = self.config
        special = (ids == cfg.pad_token_id) | (ids == cfg.cls_token_id) | (ids == cfg.sep_token_id) | (attn == 0)
        chosen = (torch.rand(ids.shape, device=ids.device) < cfg.mlm_prob) & ~special
        if not chosen.any() and (~special).any():  # at least one target per batch
            chosen.view(-1)[(~special).view(-1).nonzero()[0]] = True
        labels = ids.masked_fill(~chosen, -100)
        r = torch.rand(ids.shape, device=ids.device)
        out = ids.clone()
        out[chosen & (r < 0.8)] = cfg.mask_token_id
        rand_tok = chosen & (r >= 0.8) & (r < 0.9)
        out[rand_tok] = torch.randint(cfg.vocab_size, (int(rand_tok.sum()),), device=ids.device)
        return out, labels

    def _mask_regions(self, image_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ViLBERT's region masking of ``mrm_prob`` of the grid cells (never ``[IMG]``): a masked
        feature is zeroed 90 % of the time.  Returns ``(features, masked (B, N) bool)``."""
        b, t, _ = image_embeds.shape
        chosen = torch.rand(b, t - 1, device=image_embeds.device) < self.config.mrm_prob
        if not chosen.any():
            chosen[0, 0] = True
        zero = chosen & (torch.rand(b, t - 1, device=image_embeds.device) < 0.9)
        keep = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=zero.device), ~zero], 1)
        return image_embeds * keep.unsqueeze(-1).to(image_embeds.dtype), chosen

    def forward(self, pixel_values: torch.Tensor, texts: Sequence[str], image_idx: Optional[torch.Tensor] = None,
                alpha: float = 0.0, weights: Optional[dict[str, float]] = None,
                hard_texts: Optional[Sequence[Optional[str]]] = None) -> dict[str, torch.Tensor]:
        """ViLBERT's pretraining objectives on a batch of aligned pairs (module docstring).
        ``image_idx (B,)`` identifies images (pairs sharing one are never each other's
        negatives); ``weights``: the loop's ``{itc, itm, lm}`` (:func:`objective_weights`);
        ``hard_texts``: per pair a hard-negative text or None, one more misaligned row each;
        ``alpha`` is BLIP's momentum-distillation ramp, unused here.  Returns ``{loss, itc,
        mlm, mrm, align}`` (an objective whose weight is 0 is skipped)."""
        cfg = self.config
        w = objective_weights(weights, cfg.mrm_weight)
        bs = pixel_values.shape[0]
        dev = pixel_values.device
        if image_idx is None:
            image_idx = torch.arange(bs, device=dev)
        idx = image_idx.view(-1).to(dev)
        image_embeds = self.encode_image(pixel_values)  # (B, 1+N, Dv)
        ids, attn = self.tokenize(texts, "enc")
        out: dict[str, torch.Tensor] = {}
        loss = image_embeds.sum() * 0.0

        if w["itc"] > 0:  # the dual-encoder head, in-batch (pairs of one image are positives)
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            img_f, txt_f = self.image_feat(image_embeds), self.text_feat_ids(ids, attn)
            pos = (idx[:, None] == idx[None, :]).float()
            targets = pos / pos.sum(1, keepdim=True)
            sim = img_f @ txt_f.t() / self.temp
            out["itc"] = (-(F.log_softmax(sim, 1) * targets).sum(1).mean()
                          - (F.log_softmax(sim.t(), 1) * targets).sum(1).mean()) / 2
            loss = loss + w["itc"] * out["itc"]

        need_mm = w["mlm"] > 0 or w["mrm"] > 0
        if not (need_mm or w["align"] > 0):
            out["loss"] = loss
            return out
        # rows: the B aligned pairs; then (alignment) B misaligned and the hard negatives
        row_img = [torch.arange(bs, device=dev)]
        row_ids, row_attn = [ids], [attn]
        n_neg = 0
        if w["align"] > 0:
            neg_j = self._negative_texts(ids, idx)
            have = (neg_j >= 0).nonzero().view(-1)
            row_img.append(have)
            row_ids.append(ids[neg_j[have]])
            row_attn.append(attn[neg_j[have]])
            n_neg = int(have.numel())
            hard_rows = [i for i, t in enumerate(hard_texts or ()) if t]
            if hard_rows:
                h_ids, h_attn = self.tokenize([hard_texts[i] for i in hard_rows], "enc")
                row_img.append(torch.tensor(hard_rows, device=dev))
                row_ids.append(h_ids)
                row_attn.append(h_attn)
                n_neg += len(hard_rows)
        length = max(t.shape[1] for t in row_ids)
        all_ids = torch.cat([F.pad(t, (0, length - t.shape[1]), value=cfg.pad_token_id) for t in row_ids])
        all_attn = torch.cat([F.pad(t, (0, length - t.shape[1]), value=0) for t in row_attn])
        all_img = torch.cat(row_img)
        masked_ids, mlm_labels = self._mask_words(all_ids, all_attn)
        masked_img, region_masked = self._mask_regions(image_embeds[all_img])
        text_out, image_out = self.co_streams(self.embed_text(masked_ids, all_attn), all_attn,
                                              self.embed_image(masked_img))

        if w["mlm"] > 0:  # on the aligned rows only
            h = self.mlm_transform(text_out[:bs])
            logits = h @ self.word_embeddings.weight.t() + self.mlm_bias
            out["mlm"] = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), mlm_labels[:bs].reshape(-1),
                                         ignore_index=-100)
            loss = loss + w["mlm"] * out["mlm"]
        if w["mrm"] > 0:
            sel = region_masked[:bs]  # (B, N)
            target = self.region_targets(pixel_values, image_embeds.shape[1] - 1)[sel]  # (M, K)
            logp = F.log_softmax(self.mrm_head(image_out[:bs, 1:][sel]).float(), dim=-1)
            out["mrm"] = F.kl_div(logp, target, reduction="batchmean")
            loss = loss + w["mrm"] * out["mrm"]
        if w["align"] > 0:
            logits = self._align_logits(text_out, image_out)
            labels = torch.cat([torch.ones(bs), torch.zeros(n_neg)]).long().to(dev)
            out["align"] = F.cross_entropy(logits.float(), labels)
            loss = loss + w["align"] * out["align"]
        out["loss"] = loss
        return out

    @torch.no_grad()
    def _negative_texts(self, ids: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """For each pair, the batch row of another pair's text: not the same image, not the same
        caption (the synthetic world repeats captions); ``-1`` where none is allowed."""
        same_caption = (ids.unsqueeze(1) == ids.unsqueeze(0)).all(-1)
        allowed = ~(same_caption | (idx[:, None] == idx[None, :]))
        pick = torch.multinomial(allowed.float() + (~allowed.any(1, keepdim=True)).float(), 1).view(-1)
        return torch.where(allowed.any(1), pick, torch.full_like(pick, -1))

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` (``model_type: vlp-vilbert``, ``family: vilbert``) +
        ``model.safetensors`` (+ ``tokenizer/``) into ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"model_type": MODEL_TYPE, **asdict(self.config)}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / WEIGHTS_FILE),
                  metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(d / TOKENIZER_DIR))
        return d

    @classmethod
    def create(cls, d: dict[str, Any], tokenizer=None) -> "ViLBERT":
        """A fresh model from an architecture dict (what :func:`vlp_core.models.create_model`
        calls for this family); token ids and vocabulary size come from ``tokenizer``."""
        if tokenizer is not None:
            d = {**d, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                 "cls_token_id": tokenizer.cls_token_id, "sep_token_id": tokenizer.sep_token_id,
                 "mask_token_id": tokenizer.mask_token_id}
        return cls(VilbertConfig.from_dict(d), tokenizer=tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "ViLBERT":
        from safetensors.torch import load_model

        d = Path(directory)
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise ModelError(f"{d}: not a vlp model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        raw = json.loads((d / CONFIG_FILE).read_text())
        if raw.get("model_type") != MODEL_TYPE:
            raise ModelError(f"{d}/{CONFIG_FILE}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r}")
        try:
            config = VilbertConfig.from_dict(raw)
        except (ModelError, TypeError) as exc:
            raise ModelError(f"{d}/{CONFIG_FILE}: {exc}") from None
        tok_dir = d / TOKENIZER_DIR
        model = cls(config, tokenizer=load_tokenizer(tok_dir) if tok_dir.is_dir() else None)
        load_model(model, str(d / WEIGHTS_FILE), strict=True, device=map_location)
        return model


def is_vilbert_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved ViLBERT (``config.json`` with ``model_type: vlp-vilbert``)."""
    cfg = Path(directory) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def create_vilbert(arch: str | Path = "vilbert-tiny", tokenizer=None, **overrides: Any) -> ViLBERT:
    """A freshly initialised :class:`ViLBERT` of architecture ``arch`` (a name in
    ``vlp_core/models/architectures/`` or a .json path whose ``family`` is ``vilbert``); token
    ids and vocabulary size come from ``tokenizer``; ``overrides`` replace architecture fields.
    The region codebook is fitted later, from the training images (:meth:`ViLBERT.prepare_training`)."""
    d = {**load_architecture(arch), **overrides}
    if d.get("family", FAMILY) != FAMILY:
        raise ModelError(f"architecture {arch!r} has family {d.get('family')!r}, not {FAMILY!r}")
    return ViLBERT.create(d, tokenizer)


__all__ = ["FAMILY", "LOSS_NAMES", "MODEL_TYPE", "CoAttention", "ViLBERT", "VilbertConfig", "create_vilbert",
           "is_vilbert_dir", "objective_weights"]
