"""Hugging Face BLIP interop for :class:`~vlp_core.models.BlipMED`: export and import.

* :func:`export_captioner` writes a ``transformers.BlipForConditionalGeneration`` folder
  (vision encoder + ``text_decoder``), :func:`export_filter` a
  ``transformers.BlipForImageTextRetrieval`` folder (vision encoder + ``text_encoder`` +
  ``vision_proj`` / ``text_proj`` / ``itm_head``).  Each folder holds ``config.json``
  (``BlipConfig``, plus ``itm_first_token``: see below), ``model.safetensors``, the tokenizer
  files and a ``preprocessor_config.json`` (``BlipImageProcessor`` with the model's image size,
  mean and std), so ``BlipProcessor.from_pretrained(out)`` / ``AutoTokenizer`` / the model
  class load it offline.  Momentum encoders, queues and ``temp`` are training state and are
  not exported.
* :func:`import_hf` loads a local HF BLIP folder of either class (e.g. the official
  ``Salesforce/blip-image-captioning-*`` or ``blip-itm-*`` downloads) as a ``BlipMED``
  starting model; :func:`is_hf_blip_dir` recognises one.  ``BlipMED`` shares everything but
  self-attention between its text encoder and decoder, so the half a checkpoint lacks is
  initialised from the half it has (a captioning checkpoint's decoder gives the encoder,
  self-attention included; a retrieval checkpoint's encoder gives the decoder).  Heads the
  checkpoint does not have (ITC/ITM heads of a captioner; the LM head transform of a
  retrieval model) stay freshly initialised, with a logged warning.  An explicit
  ``label_smoothing`` (``text_config``) is kept, 0.0 included; only a missing key takes
  :class:`MedConfig`'s 0.1.

**Image settings** (:func:`hf_image_spec`, also what ``vlp capfilt`` uses for an HF folder):
``image_mean``, ``image_std``, ``size``, ``do_resize`` and ``resample`` come from
``preprocessor_config.json`` (transformers < 5, our exports) or, key by key where that file
lacks them, from ``processor_config.json``'s ``image_processor`` (transformers 5's
``BlipProcessor.save_pretrained`` writes only that).  Where neither holds a mean and std, one
warning line says so and CLIP's (``BlipImageProcessor``'s defaults) are used.

**ITM's first token** (:func:`hf_itm_first_token`): ``config.json``'s ``itm_first_token``
(``"enc"`` | ``"cls"``, default ``"enc"`` when absent; see :class:`MedConfig`) decides whether
``[ENC]`` or ``[CLS]`` leads the ITM text input.  Exports write it, imports copy it into the
vlp checkpoint and the CapFilt HF backend reads it, so a folder and its imported copy score
alike.  To score an HF folder the way ``BlipForImageTextRetrieval`` + ``BlipProcessor`` do,
set ``"itm_first_token": "cls"`` in its ``config.json``.

**Which backbones export.**  Only BLIP-shaped timm ViTs (``timm...VisionTransformer``): one
CLS token (no register tokens), learned absolute position embeddings covering the CLS
token, no pre-norm before the blocks (``norm_pre``), pre-norm blocks with a fused ``qkv``
projection, a plain GELU MLP, no layer scale or q/k norm, and a final LayerNorm; e.g. the
``tiny-vit`` and ``blip-base`` architectures.  Anything else is refused with a
:class:`~vlp_core.models.ModelError` naming the backbone: in particular the CPU demo's CNN
(``tiny``, timm model ``vlp_cnn_tiny``), which has no HF BLIP counterpart.

Notes: exports set the vision ``layer_norm_eps`` to the ViT's (1e-6 for timm's ViTs) and
``hidden_act`` to its activation, so HF reproduces the model exactly.  An import builds a timm
ViT whose LayerNorm eps matches the folder's: ``vit_base_patch16_224`` (1e-6) or, for 1e-5 (the
official BLIP folders' value), ``vit_base_patch16_clip_224`` with ``pre_norm=False``; other
values fall back to 1e-6 with a warning.  ``BlipForImageTextRetrieval`` feeds whatever ids it
is given (the processor's ``[CLS]``-first ids), so feed it ``model.tokenize(texts, "itm")`` ids
to reproduce ours.  ``BlipImageProcessor`` gives ``BlipMED.preprocess``'s pixels (to ~1e-7) for images already at the model's size, which is
what the pipeline feeds (images are resized when decoded); for other sizes the two resize
differently (HF: the uint8 image, antialiased; ours: the [0, 1] float tensor, bicubic, see
:mod:`vlp_core.images`).
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from vlp_core.images import CLIP_MEAN, CLIP_STD, PREPROCESSOR_FILE, PROCESSOR_FILE, hf_image_spec, read_image_settings
from vlp_core.io import read_json_object
from vlp_core.models.med import (CONFIG_FILE, DEFAULT_ITM_FIRST_TOKEN, ITM_FIRST_TOKENS, BlipMED, MedConfig,
                                  ModelError)
from vlp_core.models.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

CAPTIONER_CLASS = "BlipForConditionalGeneration"
FILTER_CLASS = "BlipForImageTextRetrieval"
HF_MODEL_TYPE = "blip"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
# The timm ViT an import builds, by the HF vision LayerNorm eps (every size is given as kwargs, so
# only the entry point's LayerNorm eps matters): timm's ViTs use 1e-6, its CLIP towers 1e-5 (the
# value in the official BLIP folders), with their pre-norm switched off as BLIP's ViT has none.
IMPORT_VITS = {1e-6: ("vit_base_patch16_224", {}), 1e-5: ("vit_base_patch16_clip_224", {"pre_norm": False})}

# timm ViT block -> HF BlipEncoderLayer (both sides hold .weight/.bias under these names)
_BLOCK_MAP = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
              "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# timm activation module -> HF hidden_act (and the timm act_layer name for the way back)
_ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu"}


# --------------------------------------------------------------------------- folders
def is_hf_blip_dir(path: str | Path) -> bool:
    """Whether ``path`` is a local Hugging Face BLIP folder (``config.json`` with
    ``model_type: blip`` and weights beside it)."""
    p = Path(path)
    cfg = p / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, OSError, AttributeError):
        return False
    return model_type == HF_MODEL_TYPE and any((p / f).is_file() for f in HF_WEIGHT_FILES)


def _load_vlp(model: str | Path | BlipMED) -> BlipMED:
    """A BlipMED, or one loaded from a vlp folder (or a training output holding ``model/``)."""
    if isinstance(model, BlipMED):
        return model
    d = Path(model)
    if not (d / CONFIG_FILE).is_file() and (d / "model" / CONFIG_FILE).is_file():
        d = d / "model"
    if is_hf_blip_dir(d):
        raise ModelError(f"{d}: already a Hugging Face BLIP folder (export takes a vlp checkpoint)")
    return BlipMED.from_pretrained(d)


# --------------------------------------------------------------------------- vision mapping
def _act_name(act: nn.Module) -> str | None:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_pytorch_tanh"
    if type(act).__name__ == "QuickGELU":
        return "quick_gelu"
    return None


def _vit_config(model: BlipMED) -> dict[str, Any]:
    """``BlipVisionConfig`` kwargs of ``model``'s ViT, or a ModelError naming the backbone."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    cfg = model.config
    vit = getattr(model.visual_encoder, "model", None)

    def refuse(why: str):
        raise ModelError(f"cannot export vision backbone {cfg.vision!r} (arch {cfg.arch!r}) to Hugging Face BLIP: "
                         f"{why}. Only BLIP-shaped timm ViTs export (one CLS token, learned absolute position "
                         "embeddings, pre-norm blocks with fused qkv), e.g. the tiny-vit or blip-base architectures")

    if not isinstance(vit, VisionTransformer):
        refuse(f"it is a {type(vit).__name__}, not a timm VisionTransformer")
    if vit.cls_token is None or vit.num_prefix_tokens != 1:
        refuse("it needs exactly one class token and no register tokens")
    if vit.pos_embed is None or vit.no_embed_class:
        refuse("it needs learned absolute position embeddings that include the class token")
    if getattr(vit, "dynamic_img_size", False):
        refuse("dynamic image size is not supported")
    if not isinstance(vit.norm_pre, nn.Identity) or not isinstance(vit.patch_embed.norm, nn.Identity):
        refuse("it has a norm before the blocks (norm_pre / patch-embed norm)")
    if not isinstance(vit.norm, nn.LayerNorm):
        refuse("its final norm is not a LayerNorm")
    proj = vit.patch_embed.proj
    if not isinstance(proj, nn.Conv2d):
        refuse("its patch embedding is not a convolution")
    ks, st = tuple(proj.kernel_size), tuple(proj.stride)
    if ks != st or ks[0] != ks[1] or any(proj.padding):
        refuse("its patch embedding is not a square non-overlapping convolution")
    dim = int(vit.embed_dim)
    grid = tuple(vit.patch_embed.grid_size)
    if grid != (cfg.image_size // ks[0],) * 2:
        refuse(f"its patch grid {grid} does not match image size {cfg.image_size} / patch {ks[0]}")
    eps, heads, hidden, acts = {float(vit.norm.eps)}, set(), set(), set()
    for i, blk in enumerate(vit.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        ok = (type(blk).__name__ == "Block" and isinstance(getattr(blk, "norm1", None), nn.LayerNorm)
              and isinstance(getattr(blk, "norm2", None), nn.LayerNorm)
              and isinstance(getattr(blk, "ls1", None), nn.Identity)
              and isinstance(getattr(blk, "ls2", None), nn.Identity)
              and isinstance(getattr(attn, "qkv", None), nn.Linear) and attn.qkv.out_features == 3 * dim
              and all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
              and type(mlp) is Mlp and isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.norm, nn.Identity))
        if not ok:
            refuse(f"block {i} is not a plain pre-norm ViT block (fused qkv, GELU MLP, no layer scale or q/k norm)")
        act = _act_name(mlp.act)
        if act is None:
            refuse(f"block {i} uses activation {type(mlp.act).__name__}")
        eps.update({float(blk.norm1.eps), float(blk.norm2.eps)})
        heads.add(int(attn.num_heads))
        hidden.add(int(mlp.fc1.out_features))
        acts.add(act)
    if len(eps) != 1 or len(heads) != 1 or len(hidden) != 1 or len(acts) != 1:
        refuse("its blocks differ in LayerNorm eps, heads, MLP width or activation")
    return dict(hidden_size=dim, intermediate_size=hidden.pop(), num_hidden_layers=len(vit.blocks),
                num_attention_heads=heads.pop(), image_size=int(cfg.image_size), patch_size=int(ks[0]),
                hidden_act=acts.pop(), layer_norm_eps=eps.pop(), projection_dim=int(cfg.embed_dim))


def _vision_key_map(depth: int) -> dict[str, str]:
    """timm ``VisionTransformer`` key -> ``BlipVisionModel`` key (one table, read both ways)."""
    keys = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    for i in range(depth):
        for ours, theirs in _BLOCK_MAP.items():
            for p in ("weight", "bias"):
                keys[f"blocks.{i}.{ours}.{p}"] = f"encoder.layers.{i}.{theirs}.{p}"
    return keys


def _timm_to_hf_vision(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """timm ``VisionTransformer`` state dict -> ``BlipVisionModel`` state dict (biases timm
    leaves out stay out)."""
    return {theirs: sd[ours] for ours, theirs in _vision_key_map(depth).items() if ours in sd}


def _hf_to_timm_vision(sd: dict[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """``BlipVisionModel`` state dict -> timm ``VisionTransformer`` state dict (the inverse)."""
    return {ours: sd[theirs] for ours, theirs in _vision_key_map(depth).items()}


# --------------------------------------------------------------------------- export
def _blip_config(model: BlipMED, vision: dict[str, Any]):
    from transformers import BlipConfig

    cfg = model.config
    text = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, encoder_hidden_size=vision["hidden_size"],
                intermediate_size=cfg.intermediate_size, projection_dim=cfg.embed_dim,
                num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                max_position_embeddings=cfg.max_position_embeddings, hidden_act="gelu",
                layer_norm_eps=cfg.layer_norm_eps, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                label_smoothing=cfg.label_smoothing, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.dec_token_id,
                sep_token_id=cfg.sep_token_id, eos_token_id=cfg.sep_token_id)
    return BlipConfig(text_config=text, vision_config=vision, projection_dim=cfg.embed_dim,
                      image_text_hidden_size=cfg.embed_dim, label_smoothing=cfg.label_smoothing,
                      itm_first_token=cfg.itm_first_token)


def _write(hf_model, model: BlipMED, out_dir: str | Path) -> Path:
    """Weights + config, tokenizer files and ``preprocessor_config.json`` into ``out_dir``."""
    from transformers import BlipImageProcessor

    if model.tokenizer is None:
        raise ModelError("cannot export a model without a tokenizer")
    cfg = model.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model.save_pretrained(str(out))
    images = BlipImageProcessor(size={"height": int(cfg.image_size), "width": int(cfg.image_size)},
                                image_mean=[float(x) for x in cfg.image_mean],
                                image_std=[float(x) for x in cfg.image_std])
    tok = copy.deepcopy(model.tokenizer)
    if "[ENC]" not in tok.all_special_tokens:  # as the official BLIP tokenizer: [DEC] bos, [ENC] special
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]}, replace_extra_special_tokens=False)
    if len(tok) != len(model.tokenizer):
        raise ModelError("exporting the tokenizer changed its vocabulary (was [ENC] missing?)")
    tok.model_max_length = int(cfg.max_position_embeddings)
    tok.save_pretrained(str(out))
    images.save_pretrained(str(out))  # preprocessor_config.json (what BlipProcessor / AutoImageProcessor read)
    return out


def _export(model: BlipMED, cls_name: str, text_part: str) -> Any:
    import transformers

    vision = _vit_config(model)
    hf_model = getattr(transformers, cls_name)(_blip_config(model, vision)).eval()
    sd = {f"vision_model.{k}": v for k, v in
          _timm_to_hf_vision(model.visual_encoder.model.state_dict(), vision["num_hidden_layers"]).items()}
    if text_part == "decoder":
        sd.update({f"text_decoder.{k}": v for k, v in model.text_decoder.state_dict().items()})
    else:
        sd.update({f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()})
        for head in ("vision_proj", "text_proj", "itm_head"):
            sd.update({f"{head}.{k}": v for k, v in getattr(model, head).state_dict().items()})
    want = hf_model.state_dict()
    for k, v in want.items():  # a ViT built without some bias (e.g. qkv_bias=False): zeros are exact
        if k not in sd and k.startswith("vision_model.") and k.endswith(".bias"):
            sd[k] = torch.zeros_like(v)
    missing, unexpected = set(want) - set(sd), set(sd) - set(want)
    if missing or unexpected:
        raise ModelError(f"{cls_name}: weight mapping mismatch (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    hf_model.load_state_dict(sd, strict=True)
    return hf_model


def export_captioner(vlp_dir: str | Path | BlipMED, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as a ``transformers.BlipForConditionalGeneration`` folder (vision
    encoder + ``text_decoder``; BOS = ``[DEC]``, EOS/SEP = ``[SEP]``).  ``vlp_dir`` is a vlp
    checkpoint folder (or a training output holding ``model/``, or a BlipMED)."""
    model = _load_vlp(vlp_dir)
    return _write(_export(model, CAPTIONER_CLASS, "decoder"), model, out_dir)


def export_filter(vlp_dir: str | Path | BlipMED, out_dir: str | Path) -> Path:
    """Write ``out_dir`` as a ``transformers.BlipForImageTextRetrieval`` folder (vision
    encoder, ``text_encoder``, ``vision_proj``, ``text_proj``, ``itm_head``)."""
    model = _load_vlp(vlp_dir)
    return _write(_export(model, FILTER_CLASS, "encoder"), model, out_dir)


# --------------------------------------------------------------------------- import
def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ModelError)


def hf_itm_first_token(hf_dir: str | Path) -> str:
    """``config.json``'s ``itm_first_token`` of an HF BLIP folder (``"enc"`` when absent)."""
    path = Path(hf_dir) / CONFIG_FILE
    value = _read_json(path).get("itm_first_token", DEFAULT_ITM_FIRST_TOKEN)
    if value not in ITM_FIRST_TOKENS:
        raise ModelError(f"{path}: itm_first_token is {value!r}; expected one of {', '.join(ITM_FIRST_TOKENS)}")
    return value


def _label_smoothing(raw: dict[str, Any]) -> float:
    """``text_config.label_smoothing`` as written (0.0 included), else the top-level key, else
    :class:`MedConfig`'s default: only a missing key takes the default."""
    for where in (raw.get("text_config") or {}, raw):
        if where.get("label_smoothing") is not None:
            return float(where["label_smoothing"])
    return MedConfig.label_smoothing


def _fit_vocab(t: torch.Tensor, rows: int, init: torch.Tensor) -> torch.Tensor:
    """``t`` with its first dim grown to ``rows`` (the new rows taken from ``init``)."""
    if t.shape[0] == rows:
        return t
    out = init.clone()
    out[: t.shape[0]] = t
    return out


def import_hf(hf_dir: str | Path, **overrides: Any) -> BlipMED:
    """A :class:`BlipMED` (timm ViT + BLIP text) from a local HF BLIP folder
    (``BlipForConditionalGeneration`` or ``BlipForImageTextRetrieval``); ``overrides``
    replace :class:`MedConfig` fields (e.g. ``queue_size``, ``prompt``)."""
    import transformers

    d = Path(hf_dir)
    if not is_hf_blip_dir(d):
        raise ModelError(f"{d}: not a Hugging Face BLIP folder (needs {CONFIG_FILE} with model_type "
                         f"'{HF_MODEL_TYPE}' and one of {', '.join(HF_WEIGHT_FILES)})")
    raw = _read_json(d / CONFIG_FILE)
    archs = raw.get("architectures") or []
    cls_name = next((a for a in archs if a in (CAPTIONER_CLASS, FILTER_CLASS)), None)
    if cls_name is None:
        raise ModelError(f"{d}/{CONFIG_FILE}: architectures is {archs}; import needs {CAPTIONER_CLASS} "
                         f"(blip-image-captioning-*) or {FILTER_CLASS} (blip-itm-*)")
    try:
        hf = getattr(transformers, cls_name).from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{d}: cannot load {cls_name} ({exc})") from None
    vc, tc = hf.config.vision_config, hf.config.text_config
    tok = load_tokenizer(d)  # adds [DEC]/[ENC] when absent (BLIP's: [DEC] = bos, [ENC] additional special)
    if vc.hidden_act not in _ACTS:
        raise ModelError(f"{d}: vision hidden_act {vc.hidden_act!r} has no timm ViT counterpart")
    if tc.hidden_act != "gelu":
        raise ModelError(f"{d}: text hidden_act {tc.hidden_act!r} is not supported (BlipMED's text side uses gelu)")
    if vc.intermediate_size % vc.hidden_size:
        raise ModelError(f"{d}: vision intermediate_size {vc.intermediate_size} is not a multiple of "
                         f"hidden_size {vc.hidden_size}")
    for name, ours, theirs in (("[DEC]", tok.convert_tokens_to_ids("[DEC]"), tc.bos_token_id),
                               ("[SEP]", tok.sep_token_id, tc.sep_token_id),
                               ("[PAD]", tok.pad_token_id, tc.pad_token_id)):
        if theirs is not None and ours != theirs:
            log.warning("%s: the tokenizer's %s id is %s but text_config says %s; using the tokenizer's",
                        d, name, ours, theirs)
    vit_eps = min(IMPORT_VITS, key=lambda e: abs(e - float(vc.layer_norm_eps)))
    vit_name, vit_extra = IMPORT_VITS[vit_eps]
    if abs(float(vc.layer_norm_eps) - vit_eps) > 1e-12:
        log.warning("%s: vision layer_norm_eps is %g; the timm ViT uses %g (outputs move slightly)",
                    d, vc.layer_norm_eps, vit_eps)
    spec = hf_image_spec(d, int(vc.image_size))
    size, mean, std = spec.size, spec.mean, spec.std
    itm_first = hf_itm_first_token(d)
    enc_id = int(tok.convert_tokens_to_ids("[ENC]"))
    if itm_first == "enc" and cls_name == FILTER_CLASS and enc_id >= int(tc.vocab_size):
        log.warning("%s: itm_first_token is 'enc' but the folder's tokenizer has no [ENC] token: it is added with a "
                    "fresh embedding, so ITM scores mean little until fine-tuned (or set itm_first_token: cls in %s)",
                    d, CONFIG_FILE)
    vision_kwargs: dict[str, Any] = dict(patch_size=int(vc.patch_size), embed_dim=int(vc.hidden_size),
                                         depth=int(vc.num_hidden_layers), num_heads=int(vc.num_attention_heads),
                                         mlp_ratio=vc.intermediate_size // vc.hidden_size, global_pool="token",
                                         **vit_extra)
    if vc.hidden_act != "gelu":
        vision_kwargs["act_layer"] = _ACTS[vc.hidden_act]
    fields: dict[str, Any] = dict(
        arch=f"hf:{d.name}", vision=vit_name, vision_kwargs=vision_kwargs, image_size=size, image_mean=mean,
        image_std=std, vocab_size=max(int(tc.vocab_size), len(tok)), hidden_size=int(tc.hidden_size),
        num_hidden_layers=int(tc.num_hidden_layers), num_attention_heads=int(tc.num_attention_heads),
        intermediate_size=int(tc.intermediate_size), max_position_embeddings=int(tc.max_position_embeddings),
        max_text_len=min(35, int(tc.max_position_embeddings)),
        embed_dim=int(getattr(hf.config, "image_text_hidden_size", 256)), layer_norm_eps=float(tc.layer_norm_eps),
        label_smoothing=_label_smoothing(raw), itm_first_token=itm_first,
        pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
        enc_token_id=tok.convert_tokens_to_ids("[ENC]"), dec_token_id=tok.convert_tokens_to_ids("[DEC]"))
    fields.update(overrides)
    model = BlipMED(MedConfig.from_dict(fields), tokenizer=tok)

    hsd = hf.state_dict()
    sd = {f"visual_encoder.model.{k}": v for k, v in _hf_to_timm_vision(
        {k[len("vision_model."):]: v for k, v in hsd.items() if k.startswith("vision_model.")},
        int(vc.num_hidden_layers)).items()}
    if cls_name == CAPTIONER_CLASS:
        text = {k[len("text_decoder."):]: v for k, v in hsd.items() if k.startswith("text_decoder.")}
        sd.update({f"text_decoder.{k}": v for k, v in text.items()})
        # the encoder = the decoder's BERT (shared parts and, as a start, its self-attention)
        sd.update({f"text_encoder.{k[len('bert.'):]}": v for k, v in text.items() if k.startswith("bert.")})
        fresh = ["vision_proj", "text_proj", "itm_head"]
        log.warning("%s: a captioning checkpoint has no ITC/ITM heads: %s stay freshly initialised; the text "
                    "encoder's self-attention starts as a copy of the decoder's", d, ", ".join(fresh))
    else:
        text = {k[len("text_encoder."):]: v for k, v in hsd.items() if k.startswith("text_encoder.")}
        sd.update({f"text_encoder.{k}": v for k, v in text.items()})
        sd.update({f"text_decoder.bert.{k}": v for k, v in text.items()})
        sd["text_decoder.cls.predictions.decoder.weight"] = text["embeddings.word_embeddings.weight"]
        for head in ("vision_proj", "text_proj", "itm_head"):
            sd.update({k: v for k, v in hsd.items() if k.startswith(f"{head}.")})
        fresh = ["text_decoder.cls.predictions."]  # the LM head's transform and bias (its weight is tied)
        log.warning("%s: a retrieval checkpoint has no text decoder: its self-attention starts as a copy of the "
                    "encoder's and the LM head's transform and output bias stay freshly initialised", d)
    own = model.state_dict()
    for k, v in list(sd.items()):
        if k not in own:
            raise ModelError(f"{d}: unexpected weight {k!r} after mapping")
        if v.shape != own[k].shape:
            if v.dim() >= 1 and v.shape[1:] == own[k].shape[1:] and v.shape[0] < own[k].shape[0]:
                sd[k] = _fit_vocab(v, own[k].shape[0], own[k])  # tokenizer grew ([DEC]/[ENC] added)
            else:
                raise ModelError(f"{d}: weight {k!r} has shape {tuple(v.shape)}, the model needs {tuple(own[k].shape)}")
    with torch.no_grad():
        missing, _ = model.load_state_dict(sd, strict=False)
    momentum = ("visual_encoder_m.", "vision_proj_m.", "text_encoder_m.", "text_proj_m.")
    allowed = {"temp", "image_queue", "text_queue", "idx_queue", "queue_ptr"}
    left = [k for k in missing if k not in allowed and not k.startswith(momentum)
            and not any(k.startswith(f) for f in fresh)]
    if left:
        raise ModelError(f"{d}: weights missing after import: {left[:8]}")
    model.copy_params()
    return model


__all__ = ["CAPTIONER_CLASS", "FILTER_CLASS", "export_captioner", "export_filter", "hf_image_spec",
           "hf_itm_first_token", "import_hf", "is_hf_blip_dir", "read_image_settings"]
