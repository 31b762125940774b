"""BLIP's multimodal mixture of encoder-decoder (MED), in one readable file.

Parts (BLIP, Li et al. 2022, section 3.1):

* ``visual_encoder``: any timm model by name (:mod:`vlp_core.models.vision`), giving
  ``image_embeds (B, 1 + N, Dv)`` with a pooled/CLS token first;
* ``text_encoder``: a BERT-style :class:`transformers.BlipTextModel`.  Unimodal mode
  (``is_decoder=False``, no image) for ITC; image-grounded mode (cross-attention to
  ``image_embeds``) for ITM, its text input led by the token ``config.itm_first_token`` names
  (``[ENC]`` by default, as BLIP trains it; see :class:`MedConfig`).  transformers 5's ``BertModel`` only allows
  cross-attention in causal decoder mode; ``BlipTextModel`` chooses ``is_decoder`` per call,
  which is what BLIP needs;
* ``text_decoder``: a :class:`transformers.BlipTextLMHeadModel` (causal, ``[DEC]`` first)
  that **shares every parameter with the encoder except self-attention** (embeddings,
  cross-attention and feed-forward are the same modules), as BLIP's pretraining does; its
  LM head is tied to the word embeddings;
* heads ``vision_proj``, ``text_proj`` (into the ITC space) and ``itm_head``.

Losses (``forward``): ITC with momentum encoders, feature queues and momentum distillation
(``alpha``); ITM with hard negatives sampled from the ITC similarities, never a pair with
the same image id or the same caption; LM with label smoothing 0.1 on ``prompt + caption``
with the prompt tokens masked (so the pretrained model can already caption with BLIP's
prompt).  ITC gathers features across ranks under ``torch.distributed``.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import BlipTextConfig
from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel

from vlp_core.errors import ModelError
from vlp_core.images import ImageSpec
from vlp_core.models import families
from vlp_core.models.tokenizer import load_tokenizer
from vlp_core.models.vision import create_vision

CONFIG_FILE = "config.json"
# Which token leads the ITM text input: "enc" ([ENC], BLIP's pretraining, retrieval fine-tuning and
# LAVIS) or "cls" ([CLS], what transformers' BlipForImageTextRetrieval gets from BlipProcessor).
ITM_FIRST_TOKENS = ("enc", "cls")
DEFAULT_ITM_FIRST_TOKEN = "enc"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
MODEL_TYPE = "vlp-blip-med"


@dataclass
class MedConfig:
    """Everything needed to rebuild the model (saved as ``config.json``).

    ``itm_first_token`` (``"enc"`` | ``"cls"``): the token that leads the ITM text input, a
    property of the weights (what they were trained to read), so it is stored with them: here,
    and as ``itm_first_token`` in an exported Hugging Face folder's ``config.json``, which
    ``vlp import`` and ``vlp capfilt --filter <HF folder>`` both read, so the same weights give
    the same ITM probability either way.  Default ``"enc"`` (also for a folder without the
    field): BLIP trains and evaluates ITM with ``[ENC]`` first, and so does this platform's
    training; ``"cls"`` reproduces transformers' ``BlipForImageTextRetrieval`` fed
    ``BlipProcessor``'s ``[CLS]``-first ids (a model fine-tuned that way)."""

    arch: str = "tiny"
    vision: str = "vlp_cnn_tiny"  # a timm model name
    vision_kwargs: dict = field(default_factory=dict)
    image_size: int = 48
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    vocab_size: int = 512
    hidden_size: int = 128
    num_hidden_layers: int = 3
    num_attention_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    max_text_len: int = 32
    embed_dim: int = 128  # ITC projection size
    queue_size: int = 1024
    momentum: float = 0.995
    temp: float = 0.07
    label_smoothing: float = 0.1
    prompt: str = "a picture of "
    layer_norm_eps: float = 1e-12
    # token ids, filled from the tokenizer
    pad_token_id: int = 0
    cls_token_id: int = 2
    sep_token_id: int = 3
    enc_token_id: int = 6
    dec_token_id: int = 5
    itm_first_token: str = DEFAULT_ITM_FIRST_TOKEN

    def __post_init__(self) -> None:
        if self.itm_first_token not in ITM_FIRST_TOKENS:
            raise ModelError(f"itm_first_token is {self.itm_first_token!r}; "
                             f"expected one of {', '.join(ITM_FIRST_TOKENS)}")

    @property
    def itm_token_id(self) -> int:
        """The id that leads the ITM text input (``[ENC]`` or ``[CLS]``, by ``itm_first_token``)."""
        return self.enc_token_id if self.itm_first_token == "enc" else self.cls_token_id

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MedConfig":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for k in ("image_mean", "image_std"):
            if k in known:
                known[k] = tuple(known[k])
        return cls(**known)

    def text_config(self, vision_width: int) -> BlipTextConfig:
        return BlipTextConfig(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, encoder_hidden_size=vision_width,
            intermediate_size=self.intermediate_size, projection_dim=self.embed_dim,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            max_position_embeddings=self.max_position_embeddings, layer_norm_eps=self.layer_norm_eps,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, is_decoder=True,
            label_smoothing=self.label_smoothing, pad_token_id=self.pad_token_id, bos_token_id=self.dec_token_id,
            sep_token_id=self.sep_token_id, eos_token_id=self.sep_token_id,
        )


def _is_dist() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` concatenated on dim 0 (no gradient)."""
    if not _is_dist():
        return t
    out = [torch.zeros_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(out, t.contiguous())
    return torch.cat(out, dim=0)


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t``, with the gradient flowing into the local part."""
    if not _is_dist():
        return t
    gathered = list(concat_all_gather(t).chunk(torch.distributed.get_world_size()))
    gathered[torch.distributed.get_rank()] = t
    return torch.cat(gathered, dim=0)


class BlipMED(nn.Module):
    """The BLIP pretraining model.  See the module docstring.

    The ``blip`` family of :mod:`vlp_core.models.families`; subclasses (X-VLM) set ``family``
    and ``config_class``.  ``uses_regions``: whether ``forward`` takes ``regions`` (box
    annotations) -- the training loop passes them only then."""

    family = "blip"
    config_class = MedConfig
    uses_regions = False

    def __init__(self, config: MedConfig, tokenizer=None):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.visual_encoder = create_vision(config.vision, config.image_size, **config.vision_kwargs)
        vision_width = self.visual_encoder.num_features
        tcfg = config.text_config(vision_width)
        self.text_encoder = BlipTextModel(tcfg, add_pooling_layer=False)
        self.text_decoder = BlipTextLMHeadModel(tcfg)
        self._share_encoder_decoder()
        self.vision_proj = nn.Linear(vision_width, config.embed_dim)
        self.text_proj = nn.Linear(config.hidden_size, config.embed_dim)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        self.temp = nn.Parameter(torch.tensor(float(config.temp)))

        # momentum encoders (EMA copies; never trained by gradient)
        self.visual_encoder_m = copy.deepcopy(self.visual_encoder)
        self.vision_proj_m = copy.deepcopy(self.vision_proj)
        self.text_encoder_m = copy.deepcopy(self.text_encoder)
        self.text_proj_m = copy.deepcopy(self.text_proj)
        for m in self._momentum_pairs():
            for p in m[1].parameters():
                p.requires_grad_(False)
        q = config.queue_size
        self.register_buffer("image_queue", F.normalize(torch.randn(config.embed_dim, q), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(config.embed_dim, q), dim=0))
        self.register_buffer("idx_queue", torch.full((1, q), -100, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    # ------------------------------------------------------------------ structure
    def _share_encoder_decoder(self) -> None:
        """Decoder = encoder except self-attention (BLIP's pretraining weight sharing)."""
        enc, dec = self.text_encoder, self.text_decoder.bert
        dec.embeddings = enc.embeddings
        for le, ld in zip(enc.encoder.layer, dec.encoder.layer):
            ld.crossattention = le.crossattention
            ld.intermediate = le.intermediate
            ld.output = le.output
        self.text_decoder.cls.predictions.decoder.weight = enc.embeddings.word_embeddings.weight

    def _momentum_pairs(self):
        return [(self.visual_encoder, self.visual_encoder_m), (self.vision_proj, self.vision_proj_m),
                (self.text_encoder, self.text_encoder_m), (self.text_proj, self.text_proj_m)]

    @torch.no_grad()
    def copy_params(self) -> None:
        """Reset the momentum encoders to the online ones."""
        for online, mom in self._momentum_pairs():
            mom.load_state_dict(online.state_dict())

    @torch.no_grad()
    def _momentum_update(self) -> None:
        m = self.config.momentum
        for online, mom in self._momentum_pairs():
            for p, pm in zip(online.parameters(), mom.parameters()):
                pm.data.mul_(m).add_(p.data, alpha=1.0 - m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        image_feats, text_feats, idxs = concat_all_gather(image_feat), concat_all_gather(text_feat), concat_all_gather(idx)
        n, q = image_feats.shape[0], self.config.queue_size
        ptr = int(self.queue_ptr)
        n = min(n, q)
        end = ptr + n
        if end <= q:
            sl = slice(ptr, end)
            self.image_queue[:, sl] = image_feats[:n].T
            self.text_queue[:, sl] = text_feats[:n].T
            self.idx_queue[:, sl] = idxs[:n].view(1, -1)
        else:  # wrap around
            first = q - ptr
            self.image_queue[:, ptr:] = image_feats[:first].T
            self.text_queue[:, ptr:] = text_feats[:first].T
            self.idx_queue[:, ptr:] = idxs[:first].view(1, -1)
            rest = n - first
            self.image_queue[:, :rest] = image_feats[first:n].T
            self.text_queue[:, :rest] = text_feats[first:n].T
            self.idx_queue[:, :rest] = idxs[first:n].view(1, -1)
        self.queue_ptr[0] = end % q

    @property
    def device(self) -> torch.device:
        return self.temp.device

    def num_parameters(self, trainable_only: bool = True) -> int:
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n

    # ------------------------------------------------------------------ inputs
    @property
    def image_spec(self) -> ImageSpec:
        """The pixels the vision encoder expects (size, mean, std from the config)."""
        cfg = self.config
        return ImageSpec(int(cfg.image_size), tuple(cfg.image_mean), tuple(cfg.image_std))

    def preprocess(self, images) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` (numpy or tensor) -> normalised float ``(B, 3, S, S)``, where
        the images are (:meth:`vlp_core.images.ImageSpec.preprocess`)."""
        return self.image_spec.preprocess(images)

    def tokenize(self, texts: Sequence[str], mode: str = "enc", max_length: Optional[int] = None):
        """Token ids on the model's device.  ``mode``: ``"enc"`` ([CLS] first, for ITC),
        ``"itm"`` (``config.itm_first_token`` first: [ENC] or [CLS]) or ``"dec"`` ([DEC] first,
        ``prompt + text``)."""
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer")
        texts = [t if isinstance(t, str) else "" for t in texts]
        if mode == "dec":
            texts = [self.config.prompt + t for t in texts]
        enc = self.tokenizer(list(texts), padding="longest", truncation=True,
                             max_length=max_length or self.config.max_text_len, return_tensors="pt")
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        if mode == "itm":
            ids[:, 0] = self.config.itm_token_id
        elif mode == "dec":
            ids[:, 0] = self.config.dec_token_id
        return ids, mask

    # ------------------------------------------------------------------ encoders
    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W) -> image_embeds (B, 1 + N, Dv)``."""
        return self.visual_encoder(pixel_values)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Normalised ITC image feature ``(B, E)``."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, is_decoder=False)
        return F.normalize(self.text_proj(out.last_hidden_state[:, 0, :]), dim=-1)

    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        """Normalised ITC text feature ``(B, E)``."""
        return self.text_feat_ids(*self.tokenize(texts, "enc"))

    def itm_logits_ids(self, image_embeds: torch.Tensor, input_ids: torch.Tensor,
                       attention_mask: torch.Tensor) -> torch.Tensor:
        """ITM logits ``(B, 2)``; ``input_ids`` start with ``config.itm_token_id`` (``tokenize(.., "itm")``)."""
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds,
                                encoder_attention_mask=image_atts, is_decoder=False)
        return self.itm_head(out.last_hidden_state[:, 0, :])

    def itm_logits(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        return self.itm_logits_ids(image_embeds, *self.tokenize(texts, "itm"))

    def itm_probs(self, image_embeds: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Probability that each (image, text) row is a match, ``(B,)``."""
        return self.itm_logits(image_embeds, texts).float().softmax(dim=-1)[:, 1]

    # ------------------------------------------------------------------ losses
    def forward(self, pixel_values: torch.Tensor, texts: Sequence[str], image_idx: Optional[torch.Tensor] = None,
                alpha: float = 0.4, weights: Optional[dict[str, float]] = None,
                hard_texts: Optional[Sequence[Optional[str]]] = None) -> dict[str, torch.Tensor]:
        """BLIP's pretraining objective.  ``image_idx (B,)`` identifies images (pairs that
        share an image are positives for ITC and never ITM negatives).  ``hard_texts``: per
        pair, a compositional hard negative text (``vlp_core.train.hardneg``) or None; each one
        is one more ITM negative with the pair's own image, and one more ITC text logit for that
        image only.  Returns ``{loss, itc, itm, lm}``
        (a loss whose weight is 0 is skipped)."""
        w = {"itc": 1.0, "itm": 1.0, "lm": 1.0, **(weights or {})}
        image_embeds = self.encode_image(pixel_values)  # (B, 1+N, Dv)
        return self._med_losses(pixel_values, image_embeds, texts, image_idx, alpha, w, hard_texts)

    def _med_losses(self, pixel_values: torch.Tensor, image_embeds: torch.Tensor, texts: Sequence[str],
                    image_idx: Optional[torch.Tensor], alpha: float, w: dict[str, float],
                    hard_texts: Optional[Sequence[Optional[str]]]) -> dict[str, torch.Tensor]:
        """:meth:`forward`'s losses on already encoded images (a subclass adds its own to them)."""
        bs = pixel_values.shape[0]
        if image_idx is None:
            image_idx = torch.arange(bs, device=pixel_values.device)
        idx = image_idx.view(-1, 1).to(pixel_values.device)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out: dict[str, torch.Tensor] = {}
        zero = image_embeds.sum() * 0.0
        loss = zero

        ids, mask = self.tokenize(texts, "enc")
        hard_rows = [i for i, t in enumerate(hard_texts or ()) if t]  # pairs with a hard negative text
        need_contrast = w["itc"] > 0 or w["itm"] > 0
        if need_contrast:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
            image_feat = self.image_feat(image_embeds)  # (B, E)
            text_feat = self.text_feat_ids(ids, mask)  # (B, E)

        # ---- ITC: momentum features + queues + momentum distillation
        if w["itc"] > 0:
            idx_all = torch.cat([concat_all_gather(idx).t(), self.idx_queue.clone().detach()], dim=1)  # (1, G+Q)
            pos_idx = torch.eq(idx, idx_all).float()  # (B, G+Q)
            sim_targets = pos_idx / pos_idx.sum(1, keepdim=True)
            with torch.no_grad():
                self._momentum_update()
                image_embeds_m = self.visual_encoder_m(pixel_values)
                image_feat_m = F.normalize(self.vision_proj_m(image_embeds_m[:, 0, :]), dim=-1)
                image_feat_m_all = torch.cat([concat_all_gather(image_feat_m).t(), self.image_queue.clone().detach()], 1)
                text_out_m = self.text_encoder_m(input_ids=ids, attention_mask=mask, is_decoder=False)
                text_feat_m = F.normalize(self.text_proj_m(text_out_m.last_hidden_state[:, 0, :]), dim=-1)
                text_feat_m_all = torch.cat([concat_all_gather(text_feat_m).t(), self.text_queue.clone().detach()], 1)
                sim_i2t_m = image_feat_m @ text_feat_m_all / self.temp
                sim_t2i_m = text_feat_m @ image_feat_m_all / self.temp
                sim_i2t_targets = alpha * F.softmax(sim_i2t_m, dim=1) + (1 - alpha) * sim_targets
                sim_t2i_targets = alpha * F.softmax(sim_t2i_m, dim=1) + (1 - alpha) * sim_targets
            sim_i2t = image_feat @ text_feat_m_all / self.temp  # (B, G+Q)
            sim_t2i = text_feat @ image_feat_m_all / self.temp
            if hard_rows:  # one more text column, target 0: the pair's hard negative, for its own image only
                # (another image's true caption can equal it when the vocabulary is small, as in the
                # synthetic world: NegCLIP's all-images columns would make that a false negative)
                hard_feat = self.text_feat([hard_texts[i] for i in hard_rows])  # (H, E)
                sel = torch.tensor(hard_rows, device=image_feat.device)
                col = torch.full((bs, 1), -1e4, dtype=sim_i2t.dtype, device=sim_i2t.device)  # finite: 0 * log p stays 0
                col[sel, 0] = ((image_feat[sel] * hard_feat).sum(-1) / self.temp).to(sim_i2t.dtype)
                sim_i2t = torch.cat([sim_i2t, col], 1)
                sim_i2t_targets = F.pad(sim_i2t_targets, (0, 1))
            loss_i2t = -torch.sum(F.log_softmax(sim_i2t, dim=1) * sim_i2t_targets, dim=1).mean()
            loss_t2i = -torch.sum(F.log_softmax(sim_t2i, dim=1) * sim_t2i_targets, dim=1).mean()
            out["itc"] = (loss_i2t + loss_t2i) / 2
            loss = loss + w["itc"] * out["itc"]
            self._dequeue_and_enqueue(image_feat_m, text_feat_m, idx.view(-1))

        # ---- ITM with hard negatives mined from the (gathered) ITC similarities
        if w["itm"] > 0:
            itm_ids = ids.clone()
            itm_ids[:, 0] = self.config.itm_token_id
            out_pos = self.text_encoder(input_ids=itm_ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                                        encoder_attention_mask=image_atts, is_decoder=False)
            idx_world = concat_all_gather(idx)  # (G, 1)
            ids_world = concat_all_gather(_pad_to(itm_ids, self.config.max_text_len, self.config.pad_token_id))
            mask_world = concat_all_gather(_pad_to(mask, self.config.max_text_len, 0))
            image_embeds_world = all_gather_with_grad(image_embeds)
            image_feat_world = concat_all_gather(image_feat)
            text_feat_world = concat_all_gather(text_feat)
            with torch.no_grad():
                local_ids = _pad_to(itm_ids, self.config.max_text_len, self.config.pad_token_id)
                same_caption = (local_ids.unsqueeze(1) == ids_world.unsqueeze(0)).all(-1)  # (B, G)
                forbid = torch.eq(idx, idx_world.t()) | same_caption  # (B, G)
                sim_i2t_w = image_feat @ text_feat_world.t() / self.temp
                sim_t2i_w = text_feat @ image_feat_world.t() / self.temp
                weights_i2t = F.softmax(sim_i2t_w.float(), dim=1).masked_fill(forbid, 0)
                weights_t2i = F.softmax(sim_t2i_w.float(), dim=1).masked_fill(forbid, 0)
                weights_i2t = _fallback_uniform(weights_i2t, forbid)
                weights_t2i = _fallback_uniform(weights_t2i, forbid)
                neg_img = torch.multinomial(weights_t2i, 1).view(-1)  # a negative image per text
                neg_txt = torch.multinomial(weights_i2t, 1).view(-1)  # a negative text per image
            image_embeds_neg = image_embeds_world[neg_img]
            text_ids_neg, text_atts_neg = ids_world[neg_txt], mask_world[neg_txt]
            L = max(itm_ids.shape[1], int(text_atts_neg.sum(1).max()))
            text_ids_all = torch.cat([_pad_to(itm_ids, L, self.config.pad_token_id)[:, :L], text_ids_neg[:, :L]], 0)
            text_atts_all = torch.cat([_pad_to(mask, L, 0)[:, :L], text_atts_neg[:, :L]], 0)
            image_embeds_all = torch.cat([image_embeds_neg, image_embeds], 0)
            image_atts_all = torch.ones(image_embeds_all.shape[:-1], dtype=torch.long, device=image_embeds.device)
            out_neg = self.text_encoder(input_ids=text_ids_all, attention_mask=text_atts_all,
                                        encoder_hidden_states=image_embeds_all, encoder_attention_mask=image_atts_all,
                                        is_decoder=False)
            vl = [out_pos.last_hidden_state[:, 0, :], out_neg.last_hidden_state[:, 0, :]]  # (3B, H)
            if hard_rows:  # the pair's own image with its text changed in one place
                hard_ids, hard_mask = self.tokenize([hard_texts[i] for i in hard_rows], "itm")
                sel = torch.tensor(hard_rows, device=image_embeds.device)
                out_hard = self.text_encoder(input_ids=hard_ids, attention_mask=hard_mask,
                                             encoder_hidden_states=image_embeds[sel],
                                             encoder_attention_mask=image_atts[sel], is_decoder=False)
                vl.append(out_hard.last_hidden_state[:, 0, :])
            logits = self.itm_head(torch.cat(vl, 0))
            labels = torch.cat([torch.ones(bs), torch.zeros(2 * bs + len(hard_rows))]).long().to(logits.device)
            out["itm"] = F.cross_entropy(logits.float(), labels)
            loss = loss + w["itm"] * out["itm"]

        # ---- LM: image-grounded decoder, prompt masked, label smoothing
        if w["lm"] > 0:
            dec_ids, dec_mask = self.tokenize(texts, "dec")
            targets = dec_ids.masked_fill(dec_ids == self.config.pad_token_id, -100)
            targets[:, : self._prompt_length()] = -100
            lm_out = self.text_decoder(input_ids=dec_ids, attention_mask=dec_mask, encoder_hidden_states=image_embeds,
                                       encoder_attention_mask=image_atts, labels=targets, reduction="mean")
            out["lm"] = lm_out.loss
            loss = loss + w["lm"] * out["lm"]

        out["loss"] = loss
        return out

    def _prompt_length(self) -> int:
        # [DEC] + prompt tokens (without the trailing [SEP])
        ids = self.tokenizer(self.config.prompt.strip())["input_ids"] if self.config.prompt.strip() else [0, 0]
        return len(ids) - 1

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, pixel_values: Optional[torch.Tensor] = None, *, image_embeds: Optional[torch.Tensor] = None,
                 sample: bool = False, top_p: float = 0.9, num_beams: int = 1, max_length: int = 30,
                 min_length: int = 5, prompt: Optional[str] = None, num_return_sequences: int = 1,
                 repetition_penalty: float = 1.0, strip_prompt: bool = False) -> list[str]:
        """Captions for a batch (KV-cached decoding through ``transformers``' ``generate``).
        Returns ``B * num_return_sequences`` strings, image-major, prompt included unless
        ``strip_prompt``.  ``max_length``/``min_length`` count tokens after the prompt."""
        if image_embeds is None:
            image_embeds = self.encode_image(pixel_values)
        prompt = self.config.prompt if prompt is None else prompt
        bs = image_embeds.shape[0]
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        p_ids = self.tokenizer([prompt.strip()] * bs if prompt.strip() else [""] * bs, return_tensors="pt")["input_ids"]
        p_ids = p_ids[:, :-1].to(image_embeds.device)  # drop [SEP]
        p_ids[:, 0] = self.config.dec_token_id
        n_prompt = p_ids.shape[1]
        kw: dict[str, Any] = dict(
            input_ids=p_ids, attention_mask=torch.ones_like(p_ids), encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts, max_length=n_prompt + max_length, min_length=n_prompt + min_length,
            eos_token_id=self.config.sep_token_id, pad_token_id=self.config.pad_token_id,
            num_return_sequences=num_return_sequences, repetition_penalty=repetition_penalty,
        )
        if sample:
            kw.update(do_sample=True, top_p=top_p, top_k=0, num_beams=1)
        else:
            kw.update(do_sample=False, num_beams=num_beams)
        out = self.text_decoder.generate(**kw)
        caps = self.tokenizer.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
        caps = [c.strip() for c in caps]
        if strip_prompt:
            return caps
        return [(prompt + c).strip() for c in caps]

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` + ``model.safetensors`` (+ ``tokenizer/``) into ``directory``.  Shared
        tensors (the decoder's tied parameters) are stored once."""
        from safetensors.torch import _remove_duplicate_names, save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # blip is what a config.json without a family means: the key is written for other families
        # only, so a BLIP folder's bytes (and its content id, which CapFilt's cache keys use) stay as before
        family = {} if self.family == families.DEFAULT_FAMILY else {"family": self.family}
        cfg = {"model_type": MODEL_TYPE, **family, **asdict(self.config)}
        (d / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        # as safetensors' save_model, minus its per-dropped-name metadata: that map is written in
        # hash order, so the same weights would give different bytes from run to run
        state = self.state_dict()
        for dropped in _remove_duplicate_names(state).values():
            for name in dropped:
                del state[name]
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / WEIGHTS_FILE), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(d / TOKENIZER_DIR))
        return d

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> "BlipMED":
        """The model saved in ``directory``.  Dispatches on the ``family`` its ``config.json``
        names (absent: ``blip``, a folder saved before families existed): ``BlipMED.from_pretrained``
        -- what evaluation, CapFilt and training call -- returns that family's model
        (:mod:`vlp_core.models.families`); a subclass's loads only its own family or a subclass's."""
        from safetensors.torch import load_model

        d = Path(directory)
        if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
            raise ModelError(f"{d}: not a vlp model folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
        name = families.saved_family(d)
        if name != cls.family:
            target = families.model_class(name)
            if cls is BlipMED or (isinstance(target, type) and issubclass(target, cls)):
                return target.from_pretrained(d, map_location=map_location)
            raise ModelError(f"{d}/{CONFIG_FILE}: a {name!r} model, which {cls.__name__} cannot load "
                             "(load it with vlp_core.models.load_model)")
        raw = json.loads((d / CONFIG_FILE).read_text())
        if raw.get("model_type") != MODEL_TYPE:
            raise ModelError(f"{d}/{CONFIG_FILE}: model_type is {raw.get('model_type')!r}, expected {MODEL_TYPE!r} "
                             "(for a Hugging Face BLIP folder: `vlp import`, or vlp_core.models.hf.import_hf)")
        try:
            config = cls.config_class.from_dict(raw)
        except ModelError as exc:
            raise ModelError(f"{d}/{CONFIG_FILE}: {exc}") from None
        model = cls(config, tokenizer=load_tokenizer(d / TOKENIZER_DIR))
        load_model(model, str(d / WEIGHTS_FILE), strict=True, device=map_location)
        return model


def _pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad (or keep) ``t (B, L)`` to ``(B, length)``."""
    if t.shape[1] >= length:
        return t[:, :length]
    return F.pad(t, (0, length - t.shape[1]), value=value)


def _fallback_uniform(weights: torch.Tensor, forbid: torch.Tensor) -> torch.Tensor:
    """Rows with no allowed negative (all forbidden) sample uniformly among the others."""
    empty = weights.sum(1) <= 0
    if empty.any():
        n = weights.shape[1]
        uniform = torch.ones_like(weights[empty])
        if n > 1:
            uniform = uniform.masked_fill(forbid[empty] & (forbid[empty].sum(1, keepdim=True) < n), 0)
            uniform[uniform.sum(1) == 0] = 1.0
        weights[empty] = uniform
    return weights + 0.0
