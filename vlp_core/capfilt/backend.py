"""Model backends behind :class:`~vlp_core.capfilt.captioner.Captioner` and
:class:`~vlp_core.capfilt.filter.ItmFilter`, and the one-image-pass encoder.

A *model folder* is either

* a vlp_core checkpoint (``config.json`` with ``model_type: vlp-blip-med`` +
  ``model.safetensors`` + ``tokenizer/``), loaded with ``BlipMED.from_pretrained``; a folder
  holding such a checkpoint in ``model/`` (a training stage's output) works too;
* a vlp_core ViLBERT (``model_type: vlp-vilbert``), the filter only (:class:`VilbertBackend`); or
* a local Hugging Face BLIP folder (``config.json`` with ``model_type: blip``; the official
  ``blip-image-captioning-*`` and ``blip-itm-*`` layouts: weights, tokenizer files and
  ``preprocessor_config.json`` or transformers 5's ``processor_config.json`` side by side),
  loaded with transformers' ``BlipForConditionalGeneration`` (captioner) or
  ``BlipForImageTextRetrieval`` (filter).

Both kinds lead the ITM text input with the token the model's ``itm_first_token`` names
(``[ENC]`` by default, or ``[CLS]``; stored in ``config.json``, see
:class:`~vlp_core.models.med.MedConfig`), so an HF folder and its ``vlp import``-ed copy score
alike.

Every backend exposes the same image side: ``spec`` (its :class:`~vlp_core.images.ImageSpec`),
``preprocess`` (uint8 ``(B, H, W, 3)`` -> float ``(B, 3, S, S)``, the spec's), ``encode_image``
(-> ``(B, 1 + N, Dv)``) and a ``vision_key``: a hash of the vision weights and the
preprocessing.  :class:`ImagePass` encodes a batch once per DISTINCT ``vision_key``
(:func:`~vlp_core.images.embed_images`), so a captioner and a filter that share a frozen
vision encoder (or are the same checkpoint) cost one vision pass per image.
:class:`BackendRole` is what the captioner and the filter share: their backend, its ids and
its image pass.
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vlp_core.capfilt.fastmed import FastText
from vlp_core.errors import VlpError
from vlp_core.images import ImageSpec, autocast, embed_images, hf_image_spec
from vlp_core.models import BlipMED, ModelError
from vlp_core.models.families import generates, load_model
from vlp_core.models.hf import hf_itm_first_token

Role = Literal["captioner", "filter"]
VLP_MODEL_TYPE = "vlp-blip-med"
VILBERT_MODEL_TYPE = "vlp-vilbert"  # vlp_core.models.vilbert.MODEL_TYPE (not imported here: torch-free at import)
HF_CLASSES = {"captioner": "BlipForConditionalGeneration", "filter": "BlipForImageTextRetrieval"}


class CapfiltError(VlpError, ValueError):
    """A model folder or a setting that CapFilt cannot use (names the path or the key)."""


# --------------------------------------------------------------------------- caches
class LruCache:
    """A bounded, most-recently-used cache (the process's loaded models and folder hashes): a
    Prefect worker running many shards loads each model once, and a long-lived one going through
    round after round keeps only the ``capacity`` models it used last, not every round's."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()  # outside the lock: loading a model takes seconds
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


# a captioner and a filter per round, and the previous round's pair while a worker moves on
BACKENDS = LruCache(capacity=4)
_HASHES = LruCache(capacity=256)  # folder hashes by (path, files' names, sizes, mtimes)


def dir_content_hash(directory: str | Path, length: int = 12) -> str:
    """Short sha256 over every file's relative path and bytes (a model folder's identity).
    Memoised per process on the files' (name, size, mtime), so a worker running many shards
    hashes a large checkpoint once."""
    d = Path(directory)
    files = sorted(x for x in d.rglob("*") if x.is_file() and not x.name.startswith("."))
    stamp = (str(d.resolve()), length, tuple((str(p.relative_to(d)), p.stat().st_size, p.stat().st_mtime_ns)
                                             for p in files))

    def digest() -> str:
        h = hashlib.sha256()
        for p in files:
            h.update(str(p.relative_to(d)).encode())
            h.update(b"\0")
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()[:length]

    return _HASHES.get(stamp, digest)


def state_hash(module: torch.nn.Module, extra: Any = None) -> str:
    """sha256 of a module's tensors (names, shapes, values) plus ``extra`` (e.g. preprocessing)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def resolve_model_dir(path: str | Path) -> tuple[Path, str]:
    """``(folder, kind)`` with kind ``"vlp"`` or ``"hf"``; a folder with ``model/`` inside works."""
    p = Path(path)
    if not p.is_dir():
        raise CapfiltError(f"{p}: model folder not found")
    cfg = p / "config.json"
    if not cfg.is_file() and (p / "model" / "config.json").is_file():
        p, cfg = p / "model", p / "model" / "config.json"
    if not cfg.is_file():
        raise CapfiltError(f"{p}: not a model folder (no config.json)")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise CapfiltError(f"{cfg}: not valid JSON ({exc})") from None
    if model_type == VLP_MODEL_TYPE:
        return p, "vlp"
    if model_type == VILBERT_MODEL_TYPE:
        return p, "vilbert"
    if model_type == "blip":
        return p, "hf"
    raise CapfiltError(f"{cfg}: model_type is {model_type!r}; expected {VLP_MODEL_TYPE!r} (a vlp checkpoint), "
                       f"{VILBERT_MODEL_TYPE!r} (a vlp ViLBERT, filter only) or 'blip' (a Hugging Face BLIP folder)")


def pick_device(device: Optional[str] = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- backends
class Backend:
    """What captioner and filter need from a model; subclasses wrap one model family."""

    kind: str
    role: Role
    model_dir: Path
    model_id: str
    spec: ImageSpec
    vision_key: str
    device: torch.device
    tokenizer: Any
    max_text_len: int

    @torch.no_grad()
    def preprocess(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.spec.preprocess(images, self.device)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:  # (B,3,S,S) -> (B,1+N,Dv)
        raise NotImplementedError

    # filter side
    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:  # (B,1+N,Dv) -> (B,E)
        raise NotImplementedError

    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:  # -> (N,E)
        raise NotImplementedError

    def tokenize_pair(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One tokenization for both filter passes: ``(itc_ids, itm_ids, mask)`` ``(N, L)``."""
        raise NotImplementedError

    def text_feat_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (N, E)
        return F.normalize(self.text_proj(self.fast_encoder.encode(ids, mask)[:, 0, :]), dim=-1)

    def itm_probs_ids(self, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, cross: list) -> torch.Tensor:
        h = self.fast_encoder.encode(ids, mask, cross, index)
        return self.itm_head(h[:, 0, :]).float().softmax(dim=-1)[:, 1]

    text_proj: Any = None
    itm_head: Any = None
    fast_encoder: Any = None  # FastText over the text encoder (filter role)
    fast_decoder: Any = None  # FastText over the decoder + LM head (captioner role)

    # captioner side
    def decoder_inputs(self, prompt: str, batch_size: int) -> tuple[torch.nn.Module, torch.Tensor, int, int]:
        """``(text_decoder, prompt ids (B, P) starting with the decoder's BOS, eos id, pad id)``."""
        raise NotImplementedError

    def generate(self, image_embeds: torch.Tensor, *, sample: bool, top_p: float, num_beams: int, max_length: int,
                 min_length: int, prompt: str, num_return_sequences: int) -> list[str]:
        raise NotImplementedError


class VlpBackend(Backend):
    """A vlp_core :class:`~vlp_core.models.BlipMED` checkpoint (serves both roles)."""

    kind = "vlp"

    def __init__(self, model_dir: Path, role: Role, device: torch.device, model_id: Optional[str] = None):
        self.role, self.model_dir, self.device = role, model_dir, device
        self.model_id = model_id or dir_content_hash(model_dir)
        self.model = BlipMED.from_pretrained(model_dir).to(device).eval()  # any family (config.json's)
        family = getattr(self.model, "family", "blip")
        if role == "captioner" and not generates(family):
            raise ModelError(f"{model_dir}: a {family!r} model does not generate captions, so it cannot be "
                             "CapFilt's captioner (vlp_core/models/families.py: blip and xvlm do)")
        cfg = self.model.config
        self.spec = self.model.image_spec
        self.vision_key = "vlp:" + state_hash(self.model.visual_encoder, [self.spec, cfg.vision, cfg.vision_kwargs])
        self.tokenizer = self.model.tokenizer
        self.max_text_len = int(cfg.max_text_len)
        self.fast_encoder = FastText(self.model.text_encoder)
        self.fast_decoder = FastText(self.model.text_decoder.bert, self.model.text_decoder.cls)
        self.text_proj, self.itm_head = self.model.text_proj, self.model.itm_head

    def tokenize_pair(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.model.tokenize(list(texts), "enc")
        itm_ids = ids.clone()
        itm_ids[:, 0] = self.model.config.itm_token_id  # [ENC] (BLIP) or [CLS], by itm_first_token
        return ids, itm_ids, mask

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.image_feat(image_embeds)

    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = self.model.tokenize(list(texts), "enc")
        return F.normalize(self.model.text_proj(self.fast_encoder.encode(ids, mask)[:, 0, :]), dim=-1)

    def decoder_inputs(self, prompt: str, batch_size: int) -> tuple[torch.nn.Module, torch.Tensor, int, int]:
        cfg = self.model.config
        text = [prompt.strip()] * batch_size
        ids = self.tokenizer(text, return_tensors="pt")["input_ids"][:, :-1].to(self.device)  # drop [SEP]
        ids[:, 0] = cfg.dec_token_id
        return self.model.text_decoder, ids, cfg.sep_token_id, cfg.pad_token_id

    def generate(self, image_embeds: torch.Tensor, *, sample: bool, top_p: float, num_beams: int, max_length: int,
                 min_length: int, prompt: str, num_return_sequences: int) -> list[str]:
        return self.model.generate(image_embeds=image_embeds, sample=sample, top_p=top_p, num_beams=num_beams,
                                   max_length=max_length, min_length=min_length, prompt=prompt,
                                   num_return_sequences=num_return_sequences, strip_prompt=True)


class _ImageTokens:
    """ViLBERT's stand-in for :class:`FastText`'s per-image cross-attention cache: its
    co-attention layers read the image tokens themselves, so the "cache" is the tokens."""

    @staticmethod
    def cross_kv(image_embeds: torch.Tensor) -> torch.Tensor:
        return image_embeds


class VilbertBackend(Backend):
    """A vlp_core :class:`~vlp_core.models.vilbert.ViLBERT` checkpoint, filter role only: ITM is
    its alignment head (every candidate text through the co-attention layers with its image's
    tokens), ITC its dual-encoder head.  It has no decoder, so the captioner role is refused."""

    kind = "vilbert"

    def __init__(self, model_dir: Path, role: Role, device: torch.device, model_id: Optional[str] = None):
        if role != "filter":
            raise CapfiltError(f"{model_dir}: a ViLBERT model (family vilbert) does not generate captions; it can be "
                               "the filter, not the captioner (use a blip model as the captioner)")
        self.role, self.model_dir, self.device = role, model_dir, device
        self.model_id = model_id or dir_content_hash(model_dir)
        self.model = load_model(model_dir).to(device).eval()  # the registry's class for family vilbert
        cfg = self.model.config
        self.spec = self.model.image_spec
        self.vision_key = "vilbert:" + state_hash(self.model.visual_encoder, [self.spec, cfg.vision, cfg.vision_kwargs])
        self.tokenizer = self.model.tokenizer
        self.max_text_len = int(cfg.max_text_len)
        self.fast_encoder = _ImageTokens()

    def tokenize_pair(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, mask = self.model.tokenize(list(texts), "enc")  # [CLS] first for both heads
        return ids, ids, mask

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixel_values)

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.model.image_feat(image_embeds)

    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.text_feat(list(texts))

    def text_feat_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.text_feat_ids(ids, mask)

    def itm_probs_ids(self, ids: torch.Tensor, mask: torch.Tensor, index: torch.Tensor, cross) -> torch.Tensor:
        return self.model.itm_logits_ids(cross[index], ids, mask).float().softmax(dim=-1)[:, 1]


class HfBackend(Backend):
    """A local Hugging Face BLIP folder: ``BlipForConditionalGeneration`` for the captioner
    role, ``BlipForImageTextRetrieval`` for the filter role (mirrors their ``forward``)."""

    kind = "hf"

    def __init__(self, model_dir: Path, role: Role, device: torch.device, model_id: Optional[str] = None):
        import transformers
        from transformers import AutoTokenizer

        self.role, self.model_dir, self.device = role, model_dir, device
        self.model_id = model_id or dir_content_hash(model_dir)
        cfg = json.loads((model_dir / "config.json").read_text())
        archs = cfg.get("architectures") or []
        want = HF_CLASSES[role]
        if archs and want not in archs:
            raise CapfiltError(f"{model_dir}/config.json: architectures is {archs}; the {role} needs {want} "
                               f"(an official {'blip-image-captioning-*' if role == 'captioner' else 'blip-itm-*'} folder)")
        cls = getattr(transformers, want)
        try:
            self.model = cls.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CapfiltError(f"{model_dir}: cannot load {want} ({exc})") from None
        config = self.model.config
        self.spec = hf_image_spec(model_dir, int(config.vision_config.image_size))
        self.vision_key = "hf:" + state_hash(self.model.vision_model, [self.spec])
        self.max_text_len = min(35, int(config.text_config.max_position_embeddings))
        self.text_config = config.text_config
        if role == "filter":
            self.itm_token_id, self._itm_problem = self._itm_token_id(model_dir)
            self.fast_encoder = FastText(self.model.text_encoder)
            self.text_proj, self.itm_head = self.model.text_proj, self.model.itm_head
        else:
            self.fast_decoder = FastText(self.model.text_decoder.bert, self.model.text_decoder.cls)

    def _tok(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer([t if isinstance(t, str) else "" for t in texts], padding="longest", truncation=True,
                             max_length=self.max_text_len, return_tensors="pt")
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def _itm_token_id(self, model_dir: Path) -> tuple[Optional[int], Optional[str]]:
        """``(id, None)`` of the token leading the ITM input, by config.json's ``itm_first_token``
        (as ``vlp import`` reads it), or ``(None, why)`` when the tokenizer lacks it (ITC still works)."""
        first = hf_itm_first_token(model_dir)
        token = "[ENC]" if first == "enc" else self.tokenizer.cls_token
        tid = self.tokenizer.convert_tokens_to_ids(token) if token else None
        if tid is None or tid == self.tokenizer.unk_token_id or tid >= self.text_config.vocab_size:
            return None, (f"{model_dir}/config.json: itm_first_token is {first!r} but the tokenizer has no "
                          f"{token or '[CLS]'} token in the model's vocabulary")
        return int(tid), None

    def tokenize_pair(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.itm_token_id is None:
            raise CapfiltError(self._itm_problem)
        ids, mask = self._tok(texts)  # [CLS] first (ITC); ITM: the same ids led by itm_first_token's token
        itm_ids = ids.clone()
        itm_ids[:, 0] = self.itm_token_id
        return ids, itm_ids, mask

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.vision_model(pixel_values=pixel_values).last_hidden_state

    def image_feat(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def text_feat(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = self._tok(texts)
        return F.normalize(self.model.text_proj(self.fast_encoder.encode(ids, mask)[:, 0, :]), dim=-1)

    def decoder_inputs(self, prompt: str, batch_size: int) -> tuple[torch.nn.Module, torch.Tensor, int, int]:
        tc = self.text_config
        ids = self.tokenizer([prompt] * batch_size, return_tensors="pt")["input_ids"].to(self.device)
        ids[:, 0] = tc.bos_token_id
        return self.model.text_decoder, ids[:, :-1], tc.sep_token_id, tc.pad_token_id

    def generate(self, image_embeds: torch.Tensor, *, sample: bool, top_p: float, num_beams: int, max_length: int,
                 min_length: int, prompt: str, num_return_sequences: int) -> list[str]:
        # what BlipForConditionalGeneration.generate does after its vision pass
        bs = image_embeds.shape[0]
        tc = self.text_config
        ids = self.tokenizer([prompt] * bs, return_tensors="pt")["input_ids"].to(self.device)
        ids[:, 0] = tc.bos_token_id
        ids = ids[:, :-1]  # drop [SEP]
        n_prompt = ids.shape[1]
        atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        kw: dict[str, Any] = dict(max_length=n_prompt + max_length, min_length=n_prompt + min_length,
                                  num_return_sequences=num_return_sequences)
        kw.update(dict(do_sample=True, top_p=top_p, top_k=0, num_beams=1) if sample
                  else dict(do_sample=False, num_beams=num_beams))
        out = self.model.text_decoder.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                               eos_token_id=tc.sep_token_id, pad_token_id=tc.pad_token_id,
                                               encoder_hidden_states=image_embeds, encoder_attention_mask=atts, **kw)
        return [c.strip() for c in self.tokenizer.batch_decode(out[:, n_prompt:], skip_special_tokens=True)]


def load_backend(model_dir: str | Path, role: Role, device: Optional[str | torch.device] = None,
                 cache: bool = True) -> Backend:
    """The backend for ``model_dir`` in ``role`` (``cache``: kept in :data:`BACKENDS`, so a
    Prefect worker that runs many shards loads each model once)."""
    d, kind = resolve_model_dir(model_dir)
    dev = device if isinstance(device, torch.device) else pick_device(device)
    model_id = dir_content_hash(d)
    # a vlp checkpoint serves both roles with one object (one set of weights in memory)
    key = (model_id, "any" if kind == "vlp" else role, str(dev))

    def load() -> Backend:
        return {"vlp": VlpBackend, "vilbert": VilbertBackend, "hf": HfBackend}[kind](d, role, dev, model_id)

    return BACKENDS.get(key, load) if cache else load()


def clear_backend_cache() -> None:
    BACKENDS.clear()


# --------------------------------------------------------------------------- roles
class BackendRole:
    """What :class:`~vlp_core.capfilt.captioner.Captioner` and
    :class:`~vlp_core.capfilt.filter.ItmFilter` share: the backend of ``model_dir`` in
    ``role`` (or the ``backend`` given), its ids, and its image pass (under bf16 autocast where
    ``precision``, ``capfilt.precision``, says so)."""

    role: Role

    def __init__(self, model_dir: str | Path, device: Optional[str] = None, backend: Optional[Backend] = None,
                 precision: str = "auto"):
        self.backend = backend or load_backend(model_dir, self.role, device)
        self.precision = precision

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    @property
    def vision_key(self) -> str:
        return self.backend.vision_key

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> ``image_embeds (B, 1 + N, Dv)``."""
        return embed_images(self.backend, images, self.precision)


# --------------------------------------------------------------------------- one image pass
class ImagePass:
    """Encode a uint8 batch once per distinct vision encoder among ``backends``."""

    def __init__(self, backends: Sequence[Backend], precision: str = "auto"):
        self.precision = precision
        self.groups: dict[str, Backend] = {}
        for b in backends:
            self.groups.setdefault(b.vision_key, b)
        self.decode_size = max(b.spec.size for b in backends)
        self.passes = 0  # vision passes run (batches x distinct encoders), for tests and stats

    @property
    def n_encoders(self) -> int:
        return len(self.groups)

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> dict[str, torch.Tensor]:
        """uint8 ``(B, H, W, 3)`` -> ``{vision_key: image_embeds (B, 1 + N, Dv)}``."""
        out = {}
        for key, b in self.groups.items():
            out[key] = embed_images(b, images, self.precision)
            self.passes += 1
        return out


def iter_batches(n: int, size: int) -> Iterator[slice]:
    for i in range(0, n, max(1, size)):
        yield slice(i, min(n, i + size))
