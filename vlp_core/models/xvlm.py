"""X-VLM's multi-grained alignment (Zeng et al., ICML 2022) on BLIP's MED: the ``xvlm`` family.

X-VLM aligns texts with visual concepts at several grains: the whole image (as BLIP does) and
the regions that phrases describe, with boxes from COCO / Visual Genome.  :class:`XVLM` *is*
a :class:`~vlp_core.models.med.BlipMED` (same encoders, ITC, ITM and LM, so it captions and
filters in CapFilt as BLIP does) plus, for each ``(phrase, box)`` annotation of a pair:

* **region features**: X-VLM pools the ViT patches the box covers -- here the grid tokens of
  ``image_embeds`` whose cells overlap the box, mean-pooled into the region's first token,
  followed by the image's grid tokens with every cell outside the box masked out of
  cross-attention (the sequence X-VLM builds: pooled token + the region's patches);
* **region-text ITC**: the pooled region (``vision_proj``) against the phrase's unimodal
  ``[CLS]`` (``text_proj``), in-batch and symmetric as X-VLM's (no queue, no momentum
  distillation); regions whose phrases are the same string are all positives;
* **region-text ITM**: the phrase cross-attending to its region vs. a hard negative phrase per
  region and a hard negative region per phrase, sampled from the region ITC similarities
  (never a same-phrase pair), through the MED's ``itm_head``;
* **box prediction**: the phrase (``config.itm_token_id`` first) cross-attending to the whole
  image; an MLP on its ``[ENC]``/``[CLS]`` output predicts the sigmoid-normalised box
  ``(cx, cy, w, h)``; loss = L1 (summed over the 4 coordinates) + GIoU, averaged over boxes.

Weights (``config.json``, set in an architecture JSON; :class:`XvlmConfig`): each region loss
is a *relative* weight times the training section's weight of its image-level counterpart --
``region_itc_weight * itc_weight``, ``region_itm_weight * itm_weight`` -- so a stage that
switches ITC/ITM off (the captioner fine-tune) switches its region form off too; box
prediction (``bbox_l1_weight``, ``bbox_giou_weight``) has no image-level counterpart and
runs in every stage whose batch has boxes.  Pairs without annotations (web rows) get the
image-level losses only; a batch without any gives the region losses as 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vlp_core.models.med import BlipMED, MedConfig, ModelError

REGION_LOSSES = ("region_itc", "region_itm", "bbox_l1", "bbox_giou")


@dataclass
class XvlmConfig(MedConfig):
    """:class:`MedConfig` plus X-VLM's relative region-loss weights (X-VLM weighs all 1)."""

    region_itc_weight: float = 1.0  # x the section's itc_weight
    region_itm_weight: float = 1.0  # x the section's itm_weight
    bbox_l1_weight: float = 1.0
    bbox_giou_weight: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("region_itc_weight", "region_itm_weight", "bbox_l1_weight", "bbox_giou_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ModelError(f"{name} is {v!r}; expected a finite number >= 0")


def box_cxcywh_to_xyxy(b: torch.Tensor) -> torch.Tensor:
    cx, cy, w, h = b.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1)


def box_xyxy_to_cxcywh(b: torch.Tensor) -> torch.Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


def paired_giou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Generalised IoU of ``a[i]`` with ``b[i]`` (``(R, 4)`` xyxy each) -> ``(R,)``."""
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=eps)
    wh_c = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0)
    area_c = wh_c[:, 0] * wh_c[:, 1]
    return iou - (area_c - union) / area_c.clamp(min=eps)


def patch_mask(boxes: torch.Tensor, n_patches: int) -> torch.Tensor:
    """``(R, N)`` bool: the grid cells (row-major, ``N = g * g``) each box overlaps.  Boxes are
    normalised xyxy with ``x0 < x1`` and ``y0 < y1``, so every box covers at least one cell."""
    g = math.isqrt(n_patches)
    if g * g != n_patches:
        raise ModelError(f"X-VLM pools the patches a box covers: the vision encoder must give a square grid "
                         f"of tokens after its pooled token, got {n_patches}")
    lo = torch.arange(g, device=boxes.device, dtype=torch.float32) / g
    hi = lo + 1.0 / g
    b = boxes.float()
    cols = (lo.view(1, -1) < b[:, 2:3]) & (hi.view(1, -1) > b[:, 0:1])  # (R, g)
    rows = (lo.view(1, -1) < b[:, 3:4]) & (hi.view(1, -1) > b[:, 1:2])
    return (rows.unsqueeze(2) & cols.unsqueeze(1)).reshape(len(b), n_patches)


class XVLM(BlipMED):
    """BLIP's MED with X-VLM's region-text ITC / ITM and box prediction (module docstring)."""

    family = "xvlm"
    config_class = XvlmConfig
    uses_regions = True
    LOSS_NAMES = ("itc", "itm", "lm", "region_itc", "region_itm", "bbox_l1", "bbox_giou")  # loss.csv columns

    def __init__(self, config: XvlmConfig, tokenizer=None):
        if not isinstance(config, XvlmConfig):
            raise ModelError(f"XVLM needs an XvlmConfig, got {type(config).__name__}")
        super().__init__(config, tokenizer=tokenizer)
        h = config.hidden_size
        self.bbox_head = nn.Sequential(nn.Linear(h, h), nn.GELU(), nn.Linear(h, 4))

    # ------------------------------------------------------------------ regions
    def region_embeds(self, image_embeds: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image_embeds (R, 1+N, Dv)`` (each region's image) and ``boxes (R, 4)`` ->
        ``(region sequence (R, 1+N, Dv), its attention mask (R, 1+N))``: the mean of the covered
        patches first, then the patches, those outside the box masked."""
        patches = image_embeds[:, 1:, :]
        mask = patch_mask(boxes, patches.shape[1])
        m = mask.to(patches.dtype).unsqueeze(-1)
        pooled = (patches * m).sum(1) / m.sum(1)
        seq = torch.cat([pooled.unsqueeze(1), patches], 1)
        atts = torch.cat([torch.ones_like(mask[:, :1]), mask], 1).long()
        return seq, atts

    def predict_boxes(self, image_embeds: torch.Tensor, phrases: Sequence[str]) -> torch.Tensor:
        """The box each phrase names in its image (row ``i`` of ``image_embeds``), normalised
        ``(cx, cy, w, h)``, ``(R, 4)``."""
        ids, mask = self.tokenize(phrases, "itm")
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=atts, is_decoder=False)
        return self.bbox_head(out.last_hidden_state[:, 0, :]).float().sigmoid()

    def region_losses(self, image_embeds: torch.Tensor, regions: Optional[Sequence[Optional[Sequence[dict]]]],
                      weights: dict[str, float]) -> dict[str, torch.Tensor]:
        """X-VLM's region losses for the batch's annotations (``regions[b]``: pair ``b``'s list
        of ``{phrase, box}``, or None); only those whose weight in ``weights`` is > 0."""
        active = [k for k in REGION_LOSSES if weights.get(k, 0.0) > 0]
        items = [(b, r["phrase"], r["box"]) for b, rs in enumerate(regions or ()) if rs for r in rs]
        zero = image_embeds.new_zeros((), dtype=torch.float32)
        if not active:
            return {}
        if not items:
            return {k: zero for k in active}
        dev = image_embeds.device
        r_img = torch.tensor([b for b, _, _ in items], device=dev)
        phrases = [p for _, p, _ in items]
        boxes = torch.tensor([list(bx) for _, _, bx in items], dtype=torch.float32, device=dev)  # (R, 4) xyxy
        emb = image_embeds[r_img]  # (R, 1+N, Dv)
        out: dict[str, torch.Tensor] = {}
        n = len(items)
        enc_ids, enc_mask = self.tokenize(phrases, "enc")
        itm_ids = enc_ids.clone()
        itm_ids[:, 0] = self.config.itm_token_id

        if "region_itc" in active or "region_itm" in active:
            # (the temperature is the image-level ITC's, clamped there: region ITC/ITM run only with it on)
            seq, atts = self.region_embeds(emb, boxes)
            region_feat = F.normalize(self.vision_proj(seq[:, 0, :]), dim=-1)
            phrase_feat = self.text_feat_ids(enc_ids, enc_mask)
            sim = region_feat @ phrase_feat.t() / self.temp  # (R, R): region i vs phrase j
            keys = [p.lower() for p in phrases]
            same = torch.tensor([[a == b for b in keys] for a in keys], device=dev)
            if "region_itc" in active:
                targets = same.float() / same.float().sum(1, keepdim=True)
                l_r2p = -(F.log_softmax(sim.float(), 1) * targets).sum(1).mean()
                l_p2r = -(F.log_softmax(sim.t().float(), 1) * targets).sum(1).mean()
                out["region_itc"] = (l_r2p + l_p2r) / 2
            if "region_itm" in active:
                with torch.no_grad():  # hard negatives from the ITC similarities, never a same-phrase pair
                    w_r2p = F.softmax(sim.float(), 1).masked_fill(same, 0)
                    w_p2r = F.softmax(sim.t().float(), 1).masked_fill(same, 0)
                    rows = torch.nonzero(w_r2p.sum(1) > 0).view(-1)  # same is symmetric: the same rows both ways
                    neg_p = torch.multinomial(w_r2p[rows], 1).view(-1) if len(rows) else rows
                    neg_r = torch.multinomial(w_p2r[rows], 1).view(-1) if len(rows) else rows
                ids_all = torch.cat([itm_ids, itm_ids[neg_p], itm_ids[rows]], 0)
                mask_all = torch.cat([enc_mask, enc_mask[neg_p], enc_mask[rows]], 0)
                seq_all = torch.cat([seq, seq[rows], seq[neg_r]], 0)
                atts_all = torch.cat([atts, atts[rows], atts[neg_r]], 0)
                vl = self.text_encoder(input_ids=ids_all, attention_mask=mask_all, encoder_hidden_states=seq_all,
                                       encoder_attention_mask=atts_all, is_decoder=False).last_hidden_state[:, 0, :]
                labels = torch.cat([torch.ones(n), torch.zeros(2 * len(rows))]).long().to(dev)
                out["region_itm"] = F.cross_entropy(self.itm_head(vl).float(), labels)

        if "bbox_l1" in active or "bbox_giou" in active:
            atts_img = torch.ones(emb.shape[:-1], dtype=torch.long, device=dev)
            cls = self.text_encoder(input_ids=itm_ids, attention_mask=enc_mask, encoder_hidden_states=emb,
                                    encoder_attention_mask=atts_img, is_decoder=False).last_hidden_state[:, 0, :]
            pred = self.bbox_head(cls).float().sigmoid()  # (R, 4) cx, cy, w, h
            if "bbox_l1" in active:
                out["bbox_l1"] = (pred - box_xyxy_to_cxcywh(boxes)).abs().sum(-1).mean()
            if "bbox_giou" in active:
                out["bbox_giou"] = (1.0 - paired_giou(box_cxcywh_to_xyxy(pred), boxes)).mean()
        return out

    # ------------------------------------------------------------------ losses
    def forward(self, pixel_values: torch.Tensor, texts: Sequence[str], image_idx: Optional[torch.Tensor] = None,
                alpha: float = 0.4, weights: Optional[dict[str, float]] = None,
                hard_texts: Optional[Sequence[Optional[str]]] = None,
                regions: Optional[Sequence[Optional[Sequence[dict]]]] = None) -> dict[str, torch.Tensor]:
        """BLIP's losses (:meth:`BlipMED.forward`) plus X-VLM's region losses for ``regions``
        (per pair: a list of ``{phrase, box}`` with normalised xyxy boxes, or None).  Returns
        ``{loss, itc, itm, lm, region_itc, region_itm, bbox_l1, bbox_giou}`` (a loss whose weight
        is 0 is skipped)."""
        w = {"itc": 1.0, "itm": 1.0, "lm": 1.0, **(weights or {})}
        cfg = self.config
        rw = {"region_itc": w["itc"] * cfg.region_itc_weight, "region_itm": w["itm"] * cfg.region_itm_weight,
              "bbox_l1": cfg.bbox_l1_weight, "bbox_giou": cfg.bbox_giou_weight}
        if regions is not None and len(regions) != pixel_values.shape[0]:
            raise ModelError(f"regions has {len(regions)} rows for a batch of {pixel_values.shape[0]}")
        image_embeds = self.encode_image(pixel_values)
        out = self._med_losses(pixel_values, image_embeds, texts, image_idx, alpha, w, hard_texts)
        loss = out["loss"]
        for k, v in self.region_losses(image_embeds, regions, rw).items():
            out[k] = v
            loss = loss + rw[k] * v
        out["loss"] = loss
        return out


__all__ = ["REGION_LOSSES", "XVLM", "XvlmConfig", "box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "paired_giou",
           "patch_mask"]
